"""One way to build a run: `create(config, mesh) -> Experiment`.

Training, prediction, the benchmark and the tests all build from here, so
the model, the optimizer, the abstract state and its shardings, the compiled
train step (with every config lever: remat, gradient accumulation,
non-finite skipping, video conditioning and frame dropout) and the sampling
functions exist once. A lever added to the step is then in all of them.

Nothing heavy happens in `create`: the state is abstract
(`jax.eval_shape`) until `init_state` or a checkpoint restore fills it, and
the train step compiles when `compile_train_step` is called.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from pix2seq_d_jax import (
    checkpointing,
    config_lib,
    gc_pause,
    models,
    sharding,
    trace_cache,
    train_state,
)
from pix2seq_d_jax import data as data_lib
from pix2seq_d_jax.data import preprocess
from pix2seq_d_jax.diffusion import losses, video_conditioning
from pix2seq_d_jax.inference import sampling

PyTree = Any
# Schedule length when a duration needs the dataset size and none is given
# (prediction, benchmarks): the learning rate does not change what a step
# costs or what a checkpoint holds.
NOMINAL_TOTAL_STEPS = 10_000
# XLA options of the state's initialisation on CPU. LLVM's O1 instead of its
# default O2 for 3,184 kernels that run once (the paper model: 679 arrays'
# random numbers and key derivations): the compile takes 24.7 instead of
# 33.5 s of CPU time, and the initialisation runs in 1.3 s either way.
# Level 0 compiles faster still but runs 3x slower.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
# The trace cache's folder inside jax's persistent compilation cache.
TRACE_CACHE_SUBDIR = "pix2seq_d_jax_traces"


def init_compiler_options(devices: Iterable[jax.Device]) -> dict | None:
  """The XLA options `Experiment.init_state` compiles with on `devices`.

  `INIT_COMPILER_OPTIONS` on CPU, where they lower XLA's default level;
  none elsewhere, and none where `jax_disable_most_optimizations` has set
  the level to 0 already (they would raise it, and the compile time with
  it: the tests' tiny model's init by a third).
  """
  on_cpu = all(d.platform == "cpu" for d in devices)
  if on_cpu and not jax.config.read("jax_disable_most_optimizations"):
    return INIT_COMPILER_OPTIONS
  return None


def is_video(config: ml_collections.ConfigDict) -> bool:
  """Whether the model conditions on earlier frames (a video config)."""
  return bool(config.input.get("proceeding_frames"))


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the configured model; sizes that follow from data are derived.

  The bit count, output channels, self-conditioning input and the video
  conditioning channels come from `config.input` and `config.diffusion`, so
  `config.model` carries only architecture choices.
  """
  d = config.diffusion
  num_bits = 2 * d.bits_per_channel
  kwargs = dict(config.model)
  name = kwargs.pop("name")
  for key in ("backbone_depths", "dec_dim_mults"):
    kwargs[key] = tuple(kwargs[key])
  frames = config.input.get("proceeding_frames") or ()
  _, mask_hw = config_lib.input_sizes(config.input)
  return models.get_model(
      name,
      mask_size=mask_hw,
      num_bits=num_bits,
      num_outputs=losses.num_output_channels(
          d.loss_type, num_bits, d.softmax_groups
      ),
      self_cond=bool(d.self_cond),
      cond_channels=num_bits * len(frames),
      **kwargs,
  )


# ------------------------------------------------------------------- data


def make_source(config: ml_collections.ConfigDict, split: str) -> Any:
  """The configured data source for `split` (`input.source` by name)."""
  inp = config.input
  kwargs: dict[str, Any] = dict(
      split=split, skip_bad_examples=inp.skip_bad_examples
  )
  if split == inp.train_split and inp.max_train_examples:
    kwargs["max_examples"] = inp.max_train_examples
  if inp.source == "synthetic":
    kwargs.update(dict(inp.synthetic))
  if inp.source == "synthetic_video":
    kwargs.update(dict(inp.synthetic_video))
  if is_video(config):
    # Training reads clips: the conditioning frames, then the target.
    kwargs["clip_length"] = (
        video_conditioning.history_length(inp.proceeding_frames) + 1
        if split == inp.train_split else 1)
  return data_lib.get_source(
      inp.source, data_dir=os.path.expanduser(inp.data_dir), **kwargs
  )


def check_metadata(config: ml_collections.ConfigDict, meta: Any) -> None:
  """Checks that the dataset's classes fit the config's bit budget.

  Raises:
    config_lib.ConfigError: too many classes for the bits, or a declared
      `input.num_classes` that differs from the dataset's.
  """
  bits = config.diffusion.bits_per_channel
  if meta.num_classes > 2**bits:
    raise config_lib.ConfigError(
        f"dataset {config.input.source!r} has {meta.num_classes} classes "
        f"(incl. void), more than config.diffusion.bits_per_channel={bits} "
        f"bits can hold ({2**bits})"
    )
  declared = config.input.get("num_classes")
  if declared is not None and declared != meta.num_classes:
    raise config_lib.ConfigError(
        f"config.input.num_classes={declared}, but dataset "
        f"{config.input.source!r} has {meta.num_classes} classes incl. void"
    )


def train_preprocess_fn(config: ml_collections.ConfigDict) -> Callable:
  """The training preprocessing of one example (or clip) for `config`."""
  inp = config.input
  if is_video(config):
    fn = functools.partial(
        preprocess.preprocess_train_clip,
        proceeding_frames=tuple(inp.proceeding_frames))
  else:
    fn = preprocess.preprocess_train
  image_hw, mask_hw = config_lib.input_sizes(inp)
  return functools.partial(
      fn,
      image_size=image_hw,
      mask_size=mask_hw,
      max_instances=inp.max_instances,
      scale_range=tuple(inp.scale_range),
      flip=inp.flip,
      color_jitter_strength=inp.color_jitter,
      loss_weight_power=config.diffusion.loss_weight_power,
      stuff_identity=inp.stuff_identity,
  )


def eval_preprocess_fn(config: ml_collections.ConfigDict) -> Callable:
  """The evaluation preprocessing (resize, pad, no augmentation)."""
  image_hw, mask_hw = config_lib.input_sizes(config.input)
  return functools.partial(
      preprocess.preprocess_eval, image_size=image_hw, mask_size=mask_hw)


def batch_spec(
    config: ml_collections.ConfigDict, batch_size: int
) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global training batch (what the step reads).

  Images are [b, H, W, 3] and label maps [b, h', w'] at the config's
  (height, width) image and mask sizes.
  """
  (sh, sw), m = config_lib.input_sizes(config.input)
  spec = {
      "image": jax.ShapeDtypeStruct((batch_size, sh, sw, 3), jnp.float32),
      "semantic": jax.ShapeDtypeStruct((batch_size, *m), jnp.int32),
      "instance": jax.ShapeDtypeStruct((batch_size, *m), jnp.int32),
      "loss_weight": jax.ShapeDtypeStruct((batch_size, *m), jnp.float32),
  }
  if is_video(config):
    frames = (batch_size, len(config.input.proceeding_frames), *m)
    spec["cond_semantic"] = jax.ShapeDtypeStruct(frames, jnp.int32)
    spec["cond_instance"] = jax.ShapeDtypeStruct(frames, jnp.int32)
  return spec


def schedule_steps(
    config: ml_collections.ConfigDict, data_size: int | None
) -> tuple[int, int]:
  """(total, warmup) steps of the config's durations.

  With no `data_size` (prediction, benchmarks) a duration that needs the
  dataset's size falls back to `NOMINAL_TOTAL_STEPS` (warmup to 0).
  """
  batch_size = config.input.batch_size
  try:
    total = config_lib.steps(
        "total", config, data_size=data_size, batch_size=batch_size)
  except config_lib.ConfigError:
    if data_size is not None:
      raise
    total = NOMINAL_TOTAL_STEPS
  try:
    warmup = config_lib.steps(
        "warmup", config.optax, data_size=data_size, batch_size=batch_size,
        total_steps=total, default=0)
  except config_lib.ConfigError:
    if data_size is not None:
      raise
    warmup = 0
  return total, warmup


# ------------------------------------------------------------- experiment


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, built once from a config and a mesh.

  Attributes:
    config: the validated config.
    mesh: the device mesh.
    model: the Pix2SeqD module.
    tx: the optimizer; `lr_schedule` its learning-rate schedule.
    total_steps, warmup_steps: the schedule's lengths.
    init_fn: `init(rng) -> TrainState` with logically named (boxed) params.
    state_shardings: the sharding of every leaf of the (unboxed) state.
    abstract_state: `jax.ShapeDtypeStruct`s of the state, shardings set: the
      target of checkpoint restores and of compilation.
  """

  config: ml_collections.ConfigDict
  mesh: Mesh
  model: nn.Module
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  total_steps: int
  warmup_steps: int
  init_fn: Callable[[jax.Array], train_state.TrainState]
  state_shardings: PyTree
  abstract_state: PyTree

  # ------------------------------------------------------------ shardings

  @property
  def batch_sharding(self) -> NamedSharding:
    """The batch's leading axis over the `batch` rule's mesh axes."""
    return sharding.batch_sharding(self.mesh, self.config.sharding_rules)

  @property
  def data_parallel_size(self) -> int:
    """How many ways the batch is split (the `batch` rule's mesh axes)."""
    return sharding.data_parallel_size(
        self.mesh, self.config.sharding_rules)

  @property
  def replicated(self) -> NamedSharding:
    return sharding.replicated(self.mesh)

  @property
  def is_video(self) -> bool:
    return is_video(self.config)

  @property
  def keeps_host_heap(self) -> bool:
    """Whether training keeps freed host memory for the next step.

    `config.reuse_host_memory` on a CPU mesh: elsewhere the step's
    temporaries are device memory.
    """
    return (self.config.get("reuse_host_memory", True)
            and self.mesh.devices.flat[0].platform == "cpu")

  def batch_spec(self, batch_size: int | None = None) -> dict:
    """The global training batch's shapes (default: the config's size)."""
    return batch_spec(self.config, batch_size or self.config.input.batch_size)

  def global_batch(self, local: dict) -> dict[str, jax.Array]:
    """This process's slice of a batch as global arrays (step fields only)."""
    fields = batch_spec(self.config, 1)
    return sharding.global_batch(
        {k: local[k] for k in fields}, self.mesh, self.config.sharding_rules)

  # ---------------------------------------------------------------- state

  def init_state(self, rng: jax.Array) -> train_state.TrainState:
    """A fresh state, created directly in its shardings (never on one host).

    The initialisation runs once, so on CPU it is compiled with LLVM's
    lighter optimisation (`init_compiler_options`): the same values, about
    a quarter less compile time for a program that is all random-number
    kernels, and no slower to run (docs/speed.md).
    """
    init = jax.jit(
        lambda r: nn.unbox(self.init_fn(r)),
        out_shardings=self.state_shardings,
        compiler_options=init_compiler_options(self.mesh.devices.flat))
    with jax.set_mesh(self.mesh), gc_pause.paused():
      return init(rng)

  def restore_weights(self, path: str) -> train_state.TrainState:
    """The full state of another run's checkpoint, in this run's shardings."""
    return checkpointing.restore_weights(path, self.abstract_state)

  def restore_inference_weights(self, path: str) -> tuple[PyTree, PyTree]:
    """`(ema_params, batch_stats)` of a checkpoint: what sampling needs.

    Only those two fields are read from the checkpoint (the optimizer
    state and raw params never are), so a predictor holds, and peaks at,
    the inference weights.
    """
    weights = checkpointing.restore_subtree(
        path, self.abstract_state, ("ema_params", "batch_stats"))
    return weights["ema_params"], weights["batch_stats"]

  # ------------------------------------------------------------------ data

  def source(self, split: str) -> Any:
    """The config's data source for `split`."""
    return make_source(self.config, split)

  def eval_metadata(self) -> Any:
    """The class layout (`PanopticMetadata`) of the config's eval split.

    Raises:
      FileNotFoundError: the dataset cannot be read; the message names the
        config fields that locate it.
    """
    inp = self.config.input
    try:
      meta = make_source(self.config, inp.eval_split).metadata
    except (OSError, ValueError) as e:
      raise FileNotFoundError(
          f"cannot read the class names of config.input.source="
          f"{inp.source!r} split config.input.eval_split="
          f"{inp.eval_split!r} from config.input.data_dir="
          f"{inp.data_dir!r} ({e}); set --config.input.data_dir to the "
          "dataset the checkpoint was trained on"
      ) from e
    check_metadata(self.config, meta)
    return meta

  # ----------------------------------------------------------- train step

  def train_step_fn(self) -> Callable:
    """The pure step `(state, batch, rng) -> (state, metrics)`, levers set.

    It traces under the config's sharding rules and the mesh, so the
    models' activation constraints take effect wherever it is jitted.
    """
    c = self.config
    return sharding.with_activation_rules(train_state.make_train_step(
        self.model, self.tx, self.lr_schedule, c.diffusion,
        ema_decay=c.ema_decay, skip_nonfinite=c.skip_nonfinite_updates,
        grad_accum_steps=c.grad_accum_steps, remat=c.remat,
        frames_dropout=c.input.frames_dropout,
        ema_every_steps=c.get("ema_every_steps", 1),
    ), self.mesh, c.sharding_rules)

  @functools.cached_property
  def train_step(self) -> Callable:
    """The jitted step: explicit shardings, the state donated."""
    return jax.jit(
        self.train_step_fn(),
        in_shardings=self._train_step_in_shardings(self.batch_spec()),
        out_shardings=(self.state_shardings, self.replicated),
        donate_argnums=0,
    )

  def _train_step_in_shardings(self, spec: dict) -> tuple:
    """Shardings of the step's (state, batch, rng) for a batch spec."""
    return (self.state_shardings, {k: self.batch_sharding for k in spec},
            self.replicated)

  def lower_train_step(self, batch_size: int | None = None) -> Any:
    """The step lowered for abstract state and batch (no arrays needed).

    With jax's persistent compilation cache set and `config.trace_cache`,
    the lowered step is read from (or written to) `trace_cache`'s folder
    `<compilation cache>/pix2seq_d_jax_traces`, so a warm start skips
    tracing it; the result then is a `trace_cache.TreeLowered`, used as
    jax's `Lowered` is (`compile()`, `as_text()`, `cost_analysis()`).
    """
    spec = self.batch_spec(batch_size)
    args = (self.abstract_state, spec,
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    with jax.set_mesh(self.mesh), gc_pause.paused():
      directory = self.trace_cache_dir
      if directory is not None:
        try:
          return trace_cache.lower_step(
              self.train_step_fn(), args,
              in_shardings=self._train_step_in_shardings(spec),
              metrics_sharding=self.replicated, directory=directory,
              key=trace_cache.trace_key(
                  self.config.to_json_best_effort(sort_keys=True),
                  {"total_steps": self.total_steps,
                   "warmup_steps": self.warmup_steps},
                  self.mesh, args))
        except Exception as e:  # noqa: BLE001 - lowered below instead.
          # jax.export refuses some programs (e.g. with host callbacks);
          # a real error in the step raises again from the plain lowering.
          logging.warning("Train step not kept in the trace cache (%s: %s); "
                          "lowering it directly.", type(e).__name__, e)
      return self.train_step.lower(*args)

  @property
  def trace_cache_dir(self) -> str | None:
    """Where the lowered train step is kept, or None when it is not.

    `<jax_compilation_cache_dir>/pix2seq_d_jax_traces` when jax's
    persistent compilation cache is set and `config.trace_cache` is on.
    """
    cache = jax.config.jax_compilation_cache_dir
    if not cache or not self.config.get("trace_cache", True):
      return None
    return f"{os.fspath(cache).rstrip('/')}/{TRACE_CACHE_SUBDIR}"

  def compile_train_step(
      self, batch_size: int | None = None, *,
      lowered: threading.Event | None = None) -> Any:
    """The compiled step; call it as `compiled(state, batch, rng)`.

    `lowered`, if given, is set once the step is lowered (or its lowering
    failed), before the compile: a caller compiling in a thread can wait
    for it to start its own tracing (`train.train_and_evaluate`).
    """
    try:
      step = self.lower_train_step(batch_size)
    finally:
      if lowered is not None:
        lowered.set()
    return step.compile()

  # ------------------------------------------------------------ inference

  def predict_fn(
      self, num_classes: int, *, num_steps: int | None = None,
      return_trajectory: bool = False,
  ) -> Callable:
    """Pure `predict(params, batch_stats, image, rng) -> (semantic, instance)`.

    The image sampler (first frame of a sequence for a video model).
    """
    return sampling.make_predict_fn(
        self.model, self.config.diffusion, num_classes=num_classes,
        max_instances=self.config.input.max_instances, num_steps=num_steps,
        return_trajectory=return_trajectory,
    )

  def video_predict_fn(
      self, num_classes: int, *, first_frame_steps: int | None = None,
      later_frame_steps: int | None = None,
  ) -> Callable:
    """Pure `predict(params, batch_stats, frames, rng)` over whole clips."""
    return sampling.make_video_predict_fn(
        self.model, self.config.diffusion, num_classes=num_classes,
        max_instances=self.config.input.max_instances,
        proceeding_frames=tuple(self.config.input.proceeding_frames),
        first_frame_steps=first_frame_steps,
        later_frame_steps=later_frame_steps,
    )

  def jit_eval_predict(self, num_classes: int) -> Callable:
    """The evaluators' jitted predict function (video or image by config).

    Signature `(params, batch_stats, images, rng)`; images and outputs are
    sharded over the batch axes, weights as in the state.
    """
    if self.is_video:
      fn = self.video_predict_fn(num_classes)
    else:
      fn = self.predict_fn(num_classes)
    return jax.jit(
        sharding.with_activation_rules(
            fn, self.mesh, self.config.sharding_rules),
        in_shardings=(self.state_shardings.params,
                      self.state_shardings.batch_stats,
                      self.batch_sharding, self.replicated),
        out_shardings=self.batch_sharding,
    )


def create(
    config: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
    *,
    data_size: int | None = None,
    total_steps: int | None = None,
) -> Experiment:
  """Builds the run's model, optimizer, abstract state and shardings.

  Args:
    config: the run's config (validated here).
    mesh: the device mesh; None = `sharding.make_mesh(config.mesh)`.
    data_size: training examples, for durations given in epochs; None
      falls back to `NOMINAL_TOTAL_STEPS` where one is needed.
    total_steps: overrides the schedule's length (tests, tools).

  Returns:
    The Experiment; nothing is allocated or compiled yet.

  Raises:
    config_lib.ConfigError: an invalid config.
  """
  config_lib.validate(config)
  if mesh is None:
    mesh = sharding.make_mesh(config.mesh)
  total, warmup = schedule_steps(config, data_size)
  if total_steps is not None:
    total, warmup = total_steps, min(warmup, total_steps)
  model = build_model(config)
  tx, lr_schedule = train_state.make_optimizer(
      config.optax, total_steps=total, warmup_steps=warmup)
  image_hw, mask_hw = config_lib.input_sizes(config.input)
  init_fn = train_state.make_init_fn(
      model, tx, image_size=image_hw, mask_size=mask_hw,
      num_bits=2 * config.diffusion.bits_per_channel,
      prng_impl=config.get("init_prng_impl",
                           config_lib.INIT_PRNG_IMPL_DEFAULT),
  )
  with jax.set_mesh(mesh), gc_pause.paused():
    abstract_boxed = jax.eval_shape(init_fn, jax.random.key(0))
  state_shardings = sharding.state_shardings(
      abstract_boxed, mesh, config.sharding_rules)
  abstract_state = checkpointing.abstract_with_shardings(
      nn.unbox(abstract_boxed), state_shardings)
  return Experiment(
      config=config, mesh=mesh, model=model, tx=tx, lr_schedule=lr_schedule,
      total_steps=total, warmup_steps=warmup, init_fn=init_fn,
      state_shardings=state_shardings, abstract_state=abstract_state,
  )
