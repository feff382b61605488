"""`train_and_evaluate(config, workdir)`: the training loop, top to bottom.

Sections: mesh, model, data, state and shardings, checkpoint (resume),
step, evaluators, loop. Every process runs the same code; only process 0
writes summaries, predictions and overlays (orbax coordinates checkpoints).
SIGTERM or SIGINT (preemption, Ctrl-C) saves a checkpoint at the current step
and returns normally; rerunning the same command resumes from it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from pix2seq_d_jax import (
    checkpointing,
    config_lib,
    evaluators,
    reporting,
    sharding,
    train_state,
)
from pix2seq_d_jax import data as data_lib
from pix2seq_d_jax.data import pipeline, preprocess
from pix2seq_d_jax.diffusion import video_conditioning
from pix2seq_d_jax.models import weight_import

MODES = ("train", "eval", "train_eval")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss."""


def is_video(config: ml_collections.ConfigDict) -> bool:
  """Whether the model conditions on earlier frames (a video config)."""
  return bool(config.input.get("proceeding_frames"))


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
  """Checks that the dataset's classes fit the config's bit budget."""
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


def train_preprocess_fn(config: ml_collections.ConfigDict):
  inp = config.input
  if is_video(config):
    fn = functools.partial(
        preprocess.preprocess_train_clip,
        proceeding_frames=tuple(inp.proceeding_frames))
  else:
    fn = preprocess.preprocess_train
  return functools.partial(
      fn,
      image_size=inp.image_size,
      mask_size=inp.mask_size,
      max_instances=inp.max_instances,
      scale_range=tuple(inp.scale_range),
      flip=inp.flip,
      color_jitter_strength=inp.color_jitter,
      loss_weight_power=config.diffusion.loss_weight_power,
  )


def eval_preprocess_fn(config: ml_collections.ConfigDict):
  return functools.partial(
      preprocess.preprocess_eval,
      image_size=config.input.image_size,
      mask_size=config.input.mask_size,
  )


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. a notebook worker).
        pass
    return self

  def agreed(self) -> bool:
    """Whether to stop now, the same answer on every process.

    A signal reaches each host at its own moment; stopping after different
    steps would leave the others waiting in the next step's collectives, so
    with several processes the flag is combined (any process) each step.
    """
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.int32(local))
    return bool(np.asarray(flags).any())

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: stop now.
    self.received = signum
    logging.warning("Signal %d: checkpointing and stopping.", signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _batch_spec(config: ml_collections.ConfigDict, batch_size: int) -> dict:
  s, m = config.input.image_size, config.input.mask_size
  spec = {
      "image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
      "semantic": jax.ShapeDtypeStruct((batch_size, m, m), jnp.int32),
      "instance": jax.ShapeDtypeStruct((batch_size, m, m), jnp.int32),
      "loss_weight": jax.ShapeDtypeStruct((batch_size, m, m), jnp.float32),
  }
  if is_video(config):
    frames = (batch_size, len(config.input.proceeding_frames), m, m)
    spec["cond_semantic"] = jax.ShapeDtypeStruct(frames, jnp.int32)
    spec["cond_instance"] = jax.ShapeDtypeStruct(frames, jnp.int32)
  return spec


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, mode: str = "train_eval"
) -> dict[str, Any]:
  """Trains and/or evaluates; returns the last eval metrics (may be empty).

  Args:
    config: a validated-or-not config (it is validated here first).
    workdir: checkpoints, metrics and outputs go here; an existing workdir
      resumes.
    mode: `train`, `eval` (latest checkpoint) or `train_eval`.
  """
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
  config_lib.validate(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  logging.info(
      "Process %d of %d; %d local / %d global devices (%s).",
      jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count(), jax.devices()[0].platform,
  )

  # ----------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  dp = sharding.data_parallel_size(mesh)
  batch_size = config.input.batch_size
  if batch_size % dp or batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"config.input.batch_size={batch_size}: expected a multiple of the "
        f"{dp} data-parallel devices and {jax.process_count()} processes"
    )
  local_batch_size = batch_size // jax.process_count()

  # ---------------------------------------------------------------- model
  model = train_state.build_model(config)

  # ----------------------------------------------------------------- data
  train_source = make_source(config, config.input.train_split)
  meta = train_source.metadata
  check_metadata(config, meta)
  total_steps = config_lib.steps(
      "total", config, data_size=len(train_source), batch_size=batch_size
  )
  warmup_steps = config_lib.steps(
      "warmup", config.optax, data_size=len(train_source),
      batch_size=batch_size, total_steps=total_steps, default=0,
  )

  # ---------------------------------------------------- state and shardings
  tx, lr_schedule = train_state.make_optimizer(
      config.optax, total_steps=total_steps, warmup_steps=warmup_steps
  )
  init_fn = train_state.make_init_fn(
      model, tx, image_size=config.input.image_size,
      mask_size=config.input.mask_size,
      num_bits=2 * config.diffusion.bits_per_channel,
  )
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  with jax.set_mesh(mesh):
    abstract_boxed = jax.eval_shape(init_fn, init_rng)
  state_shardings = sharding.state_shardings(
      abstract_boxed, mesh, config.sharding_rules
  )
  abstract_state = checkpointing.abstract_with_shardings(
      nn.unbox(abstract_boxed), state_shardings
  )
  num_params = parameter_overview.count_parameters(abstract_state.params)
  logging.info(
      "Model %s: %s parameters.\n%s", config.model.name, f"{num_params:,}",
      parameter_overview.get_parameter_overview(
          abstract_state.params, include_stats=False, max_lines=60
      ),
  )

  # ----------------------------------------------------------- checkpoint
  manager = checkpointing.make_manager(workdir, keep=config.keep_ckpt)
  latest = manager.latest_step()
  data_state = None
  if latest is not None:
    logging.info("Resuming from %s step %d.", workdir, latest)
    state, data_state = checkpointing.restore(manager, latest, abstract_state)
  else:
    if mode == "eval" and not config.resume and not config.model_init:
      raise FileNotFoundError(
          f"--mode=eval: no checkpoint in {workdir}/checkpoints and neither "
          "config.resume nor config.model_init is set"
      )
    init = jax.jit(
        lambda r: nn.unbox(init_fn(r)), out_shardings=state_shardings
    )
    state = init(init_rng)
    if config.resume:
      state = checkpointing.restore_weights(config.resume, abstract_state)
    elif config.model_init:
      state = _init_weights(state, config.model_init, abstract_state)
  start_step = int(state.step)

  reporter = reporting.Reporter(workdir, total_steps=total_steps)
  reporter.write_config(config.to_dict())

  # ----------------------------------------------------------- evaluators
  if is_video(config):
    predict = train_state.make_video_predict_fn(
        model, config.diffusion, num_classes=meta.num_classes,
        max_instances=config.input.max_instances,
        proceeding_frames=tuple(config.input.proceeding_frames),
    )
  else:
    predict = train_state.make_predict_fn(
        model, config.diffusion, num_classes=meta.num_classes,
        max_instances=config.input.max_instances,
    )
  predict_jit = jax.jit(
      predict,
      in_shardings=(state_shardings.params, state_shardings.batch_stats,
                    sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=sharding.batch_sharding(mesh),
  )
  evals = {}
  if mode in ("eval", "train_eval") and len(config.evals):
    eval_source = make_source(config, config.input.eval_split)
    evals = evaluators.from_config(
        config.evals, predict_fn=predict_jit, source=eval_source,
        preprocess_fn=eval_preprocess_fn(config), mesh=mesh,
        seed=config.seed, workdir=workdir,
    )

  def run_evals(step: int, names: list[str] | None = None) -> dict:
    results = {}
    for name in names if names is not None else list(evals):
      evaluator = evals[name]
      t0 = time.time()
      with jax.set_mesh(mesh):
        metrics = evaluator.run(
            state.ema_params, state.batch_stats, step=step
        )
      scalars = {f"eval/{name}/{k}": v for k, v in metrics.items()}
      scalars[f"time/eval_{name}_secs"] = time.time() - t0
      reporter.write_scalars(step, scalars)
      results[name] = metrics
    if results and jax.process_index() == 0:
      _write_json(os.path.join(workdir, "metrics.json"),
                  {"step": step, **results})
    return results

  if mode == "eval":
    results = run_evals(start_step)
    reporter.close()
    manager.close()
    return results

  # ----------------------------------------------------------------- step
  train_iter = pipeline.make_train_loader(
      train_source,
      batch_size=local_batch_size,
      seed=config.seed,
      preprocess_fn=train_preprocess_fn(config),
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      num_workers=config.input.num_workers,
  )
  if data_state is not None:
    train_iter.set_state(data_state)
  # The first batch is read before compiling, so bad data fails in seconds
  # rather than after a long compile.
  next_local = next(train_iter) if start_step < total_steps else None
  step_fn = train_state.make_train_step(
      model, tx, lr_schedule, config.diffusion, ema_decay=config.ema_decay,
      skip_nonfinite=config.skip_nonfinite_updates,
      grad_accum_steps=config.grad_accum_steps, remat=config.remat,
      frames_dropout=config.input.frames_dropout,
  )
  batch_shardings = {k: sharding.batch_sharding(mesh)
                     for k in _batch_spec(config, batch_size)}
  train_step = jax.jit(
      step_fn,
      in_shardings=(state_shardings, batch_shardings,
                    sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0,
  )
  t0 = time.time()
  with jax.set_mesh(mesh):
    compiled = train_step.lower(
        abstract_state, _batch_spec(config, batch_size), train_rng
    ).compile()
  logging.info("Compiled the train step in %.1fs.", time.time() - t0)
  _log_memory(compiled)

  # ----------------------------------------------------------------- loop
  results: dict[str, Any] = {}
  last_good_ckpt = latest
  step = start_step
  step_t0, steps_since_log = time.time(), 0
  with _StopSignal() as stop:
    while step < total_steps and not stop.agreed():
      local, next_local = next_local, None
      if local is None:
        local = next(train_iter)
      batch = sharding.global_batch(
          {k: local[k] for k in batch_shardings}, mesh
      )
      state, metrics = compiled(state, batch, train_rng)
      step += 1
      steps_since_log += 1
      # Block every step: on CPU, queued steps with collectives deadlock
      # (STACK.md pitfall 2), and the loss is needed for the NaN check.
      metrics = jax.device_get(metrics)
      if metrics["skipped"]:
        logging.warning("Non-finite loss at step %d: update skipped.", step)
      elif not math.isfinite(float(metrics["loss"])):
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"loss is {metrics['loss']} at step {step} (last log at step "
            f"{step - steps_since_log}); last good checkpoint: "
            f"{'step ' + str(last_good_ckpt) if last_good_ckpt else 'none'} "
            f"in {workdir}/checkpoints"
        )
      reporter.step_done(step)
      if reporting.itstime(step, config.log_training_steps, total_steps,
                           first=True):
        elapsed = time.time() - step_t0
        scalars = {f"train/{k}": v for k, v in metrics.items()}
        scalars["time/steps_per_sec"] = steps_since_log / max(elapsed, 1e-9)
        scalars["time/examples_per_sec"] = (
            scalars["time/steps_per_sec"] * batch_size
        )
        reporter.write_scalars(step, scalars)
        step_t0, steps_since_log = time.time(), 0
      if reporting.itstime(step, config.ckpt_steps, total_steps):
        checkpointing.save(manager, step, state, train_iter.get_state(),
                           force=True)
        last_good_ckpt = step
      due = [name for name in evals if reporting.itstime(
          step, config.evals[name].every_steps, total_steps)]
      if due:
        results.update(run_evals(step, due))
  if stop.agreed():
    if last_good_ckpt != step and step > start_step:
      checkpointing.save(manager, step, state, train_iter.get_state(),
                         force=True)
    logging.warning("Stopped by signal at step %d; rerun to resume.", step)
  elif mode == "train_eval" and evals and not results:
    # Training had already finished (a rerun): evaluate the final state.
    results = run_evals(step)
  manager.wait_until_finished()
  manager.close()
  reporter.flush()
  reporter.close()
  return results


def _init_weights(state: Any, path: str, abstract_state: Any) -> Any:
  """Weights only from `config.model_init`; optimizer state stays fresh.

  `path` is an ImageNet ResNet-50 export (torchvision or Keras layout, .npz
  or .safetensors: only the backbone is loaded) or one of our runs (a
  workdir, its checkpoints/ folder or a step folder: every weight). Position
  embeddings are sinusoidal and computed from the input size, so a low-res
  checkpoint initialises a high-res run without interpolation.
  """
  if weight_import.is_backbone_export(path):
    params, batch_stats, report = weight_import.load_backbone_weights(
        path, state.params, state.batch_stats
    )
    ema_params, _, _ = weight_import.load_backbone_weights(
        path, state.ema_params, state.batch_stats
    )
    logging.info(
        "ImageNet backbone from %s (%s layout): %d leaves, %d keys ignored.",
        path, report["layout"], report["num_loaded"],
        len(report["ignored_keys"]),
    )
    return state.replace(
        params=params, batch_stats=batch_stats, ema_params=ema_params
    )
  loaded = checkpointing.restore_weights(path, abstract_state)
  return state.replace(
      params=loaded.params, batch_stats=loaded.batch_stats,
      ema_params=loaded.ema_params,
  )


def _log_memory(compiled: Any) -> None:
  mem = reporting.compiled_memory(compiled)
  if mem:
    logging.info(
        "Train step memory: arguments %.1f MB, outputs %.1f MB, temporaries "
        "%.1f MB.", mem["argument_bytes"] / 1e6, mem["output_bytes"] / 1e6,
        mem["temp_bytes"] / 1e6,
    )


def _write_json(path: str, payload: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value)}")
