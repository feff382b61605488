"""Train state, optimizer, and the pure diffusion train step.

`TrainState` holds arrays only (step, params, batch statistics, optimizer
state, EMA params); the model, optimizer and diffusion settings are bound
into `make_train_step` by closure, so the jitted step is
`train_step(state, batch, rng) -> (state, metrics)`.

One step (paper Algorithm 1): encode the image once; draw t ~ U(0, 1) per
example; noise the analog bits of the (semantic, instance) target; optionally
run the decoder once more without gradient for self-conditioning; predict x0
and take the weighted loss of `diffusion.losses`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pix2seq_d_jax import models
from pix2seq_d_jax.diffusion import (
    analog_bits,
    losses,
    sampler,
    schedules,
    video_conditioning,
)

PyTree = Any
REMAT_CHOICES = ("none", "encoder", "decoder", "both")
# fold_in constant of the frame-dropout random stream of video models.
_FRAMES_DROPOUT_STREAM = 0x7F1D


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
  return models.get_model(
      name,
      mask_size=(config.input.mask_size, config.input.mask_size),
      num_bits=num_bits,
      num_outputs=losses.num_output_channels(
          d.loss_type, num_bits, d.softmax_groups
      ),
      self_cond=bool(d.self_cond),
      cond_channels=num_bits * len(frames),
      **kwargs,
  )


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; arrays only."""

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  ema_params: PyTree


def learning_rate_schedule(
    opt_config: ml_collections.ConfigDict, *, total_steps: int,
    warmup_steps: int
) -> optax.Schedule:
  """Linear warmup from 0 to lr, then linear decay to lr * end_lr_factor."""
  lr = opt_config.lr
  decay = optax.linear_schedule(
      init_value=lr,
      end_value=lr * opt_config.end_lr_factor,
      transition_steps=max(1, total_steps - warmup_steps),
  )
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def _decay_mask(params: PyTree) -> PyTree:
  # Weight decay on kernels and embeddings only; biases and norm scales are
  # excluded, as in the reference optimizer (exclude_from_weight_decay).
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
    opt_config: ml_collections.ConfigDict, *, total_steps: int,
    warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping and warmup + linear decay."""
  schedule = learning_rate_schedule(
      opt_config, total_steps=total_steps, warmup_steps=warmup_steps
  )
  parts = []
  if opt_config.grad_clip_norm and opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  parts.append(
      optax.adamw(
          schedule,
          b1=opt_config.b1,
          b2=opt_config.b2,
          weight_decay=opt_config.weight_decay,
          mask=_decay_mask,
      )
  )
  return optax.chain(*parts), schedule


def make_init_fn(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    image_size: int,
    mask_size: int,
    num_bits: int,
) -> Callable[[jax.Array], TrainState]:
  """Returns `init(rng) -> TrainState` with boxed (logically named) params.

  The params keep their `nn.Partitioned` boxes so that
  `nn.get_partition_spec(jax.eval_shape(init, rng))` yields the sharding of
  every leaf, optimizer state included; callers unbox after sharding.
  """

  def init(rng: jax.Array) -> TrainState:
    image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    x_t = jnp.zeros((1, mask_size, mask_size, num_bits), jnp.float32)
    gamma = jnp.ones((1,), jnp.float32)
    kwargs = {}
    if model.self_cond:
      kwargs["self_cond_x0"] = jnp.zeros_like(x_t)
    if model.cond_channels:
      kwargs["cond_map"] = jnp.zeros(
          (1, mask_size, mask_size, model.cond_channels), jnp.float32
      )
    p_rng, d_rng = jax.random.split(rng)
    variables = model.init(
        {"params": p_rng, "dropout": d_rng},
        image,
        x_t,
        gamma,
        train=False,
        **kwargs,
    )
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
    )

  return init


def _tree_norm(tree: PyTree) -> jax.Array:
  return optax.tree.norm(tree)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    diff_config: ml_collections.ConfigDict,
    *,
    ema_decay: float,
    skip_nonfinite: bool = False,
    grad_accum_steps: int = 1,
    remat: str = "none",
    frames_dropout: float = 0.0,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Returns the pure train step `(state, batch, rng) -> (state, metrics)`.

  Args:
    model: the Pix2SeqD module.
    tx: the optimizer.
    schedule: the learning-rate schedule (for the logged lr).
    diff_config: `config.diffusion`.
    ema_decay: decay of the exponential moving average of the params.
    skip_nonfinite: if the loss or a gradient is NaN/inf, keep the previous
      params, optimizer state, EMA and batch statistics (the step counter
      still advances) and report `skipped` = 1, instead of applying it.
    grad_accum_steps: split the batch into this many micro-batches run one
      after another (`lax.scan`) and average their gradients: the same
      update as the full batch (exactly so without batch norm and dropout)
      at a fraction of the activation memory.
    remat: `none`, `encoder`, `decoder` or `both`: which parts recompute
      their activations in the backward pass instead of storing them.
    frames_dropout: video models (`model.cond_channels > 0`) read the
      ground-truth masks of the conditioning frames from the batch
      (`cond_semantic`, `cond_instance` int32 [b, F, m, m]); each frame is
      replaced by a zero map with this probability.

  Returns:
    The step function; jit it with donated state.
  """
  d = diff_config
  bits = d.bits_per_channel
  if remat not in REMAT_CHOICES:
    raise ValueError(f"remat={remat!r}; expected one of {REMAT_CHOICES}")

  def encode_fn(params, batch_stats, image, key):
    return model.apply(
        {"params": params, "batch_stats": batch_stats},
        image,
        train=True,
        method="encode",
        mutable=["batch_stats"],
        rngs={"dropout": key},
    )

  def decode_fn(params, batch_stats, x_t, gamma_t, encoded, x0_sc, cond_map,
                key):
    return model.apply(
        {"params": params, "batch_stats": batch_stats},
        x_t,
        gamma_t,
        encoded,
        self_cond_x0=x0_sc,
        cond_map=cond_map,
        train=True,
        method="decode",
        rngs={"dropout": key},
    )

  # Rematerialisation: keep only each part's inputs for the backward pass
  # and recompute its activations there (less memory, one more forward).
  if remat in ("encoder", "both"):
    encode_fn = jax.checkpoint(encode_fn)
  if remat in ("decoder", "both"):
    decode_fn = jax.checkpoint(decode_fn)

  def loss_fn(params, batch_stats, micro, use_sc, k_drop, k_drop_sc):
    """Loss of one (micro-)batch of noised examples; see `train_step`."""
    x_t, gamma_t = micro["x_t"], micro["gamma_t"]
    encoded, new_vars = encode_fn(params, batch_stats, micro["image"], k_drop)

    def decode(x0_sc, key):
      return decode_fn(params, batch_stats, x_t, gamma_t, encoded, x0_sc,
                       micro.get("cond_map"), key)

    x0_sc = None
    if d.self_cond:
      # Self-conditioning (Analog Bits): with probability self_cond_rate per
      # batch, a first decoder pass without gradient estimates x0, which
      # conditions the second pass; zeros otherwise. lax.cond runs the extra
      # pass only when it is used.
      def estimate(_):
        out = decode(jnp.zeros_like(x_t), k_drop_sc)
        est = losses.predict_x0(
            out, x_t=x_t, gamma_t=gamma_t, loss_type=d.loss_type,
            scale=d.bit_scale, softmax_groups=d.softmax_groups,
        )
        return jax.lax.stop_gradient(est)

      x0_sc = jax.lax.cond(
          use_sc, estimate, lambda _: jnp.zeros_like(x_t), None
      )
    output = decode(x0_sc, k_drop)
    loss, _ = losses.diffusion_loss(
        output,
        x0_bits=micro["x0_bits"],
        x_t=x_t,
        gamma_t=gamma_t,
        eps=micro["eps"],
        weights=micro["loss_weight"],
        loss_type=d.loss_type,
        scale=d.bit_scale,
        softmax_groups=d.softmax_groups,
    )
    return loss, new_vars.get("batch_stats", {})

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def _train_conditioning(batch, key):
    """Ground-truth masks of earlier frames, with frame dropout, as bits."""
    if "cond_semantic" not in batch or "cond_instance" not in batch:
      raise ValueError(
          f"The model conditions on {model.cond_channels} channels of "
          "earlier frames (config.input.proceeding_frames), so the batch "
          "needs 'cond_semantic' and 'cond_instance' [b, frames, m, m]; got "
          f"fields {sorted(batch)}.")
    sem = batch["cond_semantic"]
    keep = video_conditioning.frame_dropout_keep(
        key, sem.shape[0], sem.shape[1], frames_dropout)
    return video_conditioning.conditioning_map(
        sem, batch["cond_instance"], bits_per_channel=bits, scale=d.bit_scale,
        code=d.bit_code, keep=keep)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    k_t, k_eps, k_drop, k_sc, k_drop_sc = jax.random.split(rng, 5)
    b = batch["image"].shape[0]
    # Noise for the whole batch first, so that gradient accumulation over
    # micro-batches sees exactly the examples of one big batch.
    x0_bits = losses.bits_from_mask(
        batch["semantic"], batch["instance"], bits_per_channel=bits,
        code=d.bit_code,
    )
    x0 = (2.0 * x0_bits.astype(jnp.float32) - 1.0) * d.bit_scale
    t = jax.random.uniform(k_t, (b,), jnp.float32)
    gamma_t = schedules.gamma(t, d.schedule)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    examples = {
        "image": batch["image"],
        "x0_bits": x0_bits,
        "x_t": schedules.add_noise(x0, gamma_t, eps),
        "gamma_t": gamma_t,
        "eps": eps,
        "loss_weight": batch["loss_weight"],
    }
    if model.cond_channels:
      # A separate stream, so image models keep their exact random numbers.
      k_frames = jax.random.fold_in(rng, _FRAMES_DROPOUT_STREAM)
      examples["cond_map"] = _train_conditioning(batch, k_frames)
    use_sc = jax.random.uniform(k_sc) < d.self_cond_rate
    if grad_accum_steps == 1:
      (loss, batch_stats), grads = grad_fn(
          state.params, state.batch_stats, examples, use_sc, k_drop,
          k_drop_sc,
      )
    else:
      # Micro-batch i holds examples i, i + k, i + 2k, ... so that each one
      # is spread over the data-parallel devices like the full batch.
      micro = jax.tree.map(
          lambda x: x.reshape(
              (b // grad_accum_steps, grad_accum_steps) + x.shape[1:]
          ).swapaxes(0, 1),
          examples,
      )

      def accumulate(carry, inputs):
        loss_sum, grad_sum, stats = carry
        i, micro_batch = inputs
        (loss_i, stats), grads_i = grad_fn(
            state.params, stats, micro_batch, use_sc,
            jax.random.fold_in(k_drop, i), jax.random.fold_in(k_drop_sc, i),
        )
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads_i)
        return (loss_sum + loss_i, grad_sum, stats), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads, batch_stats), _ = jax.lax.scan(
          accumulate,
          (jnp.zeros((), jnp.float32), zeros, state.batch_stats),
          (jnp.arange(grad_accum_steps), micro),
      )
      loss = loss / grad_accum_steps
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = jax.tree.map(
        lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
        state.ema_params,
        params,
    )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
    )
    grad_norm = _tree_norm(grads)
    skipped = jnp.zeros((), jnp.float32)
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      new_state = jax.tree.map(
          lambda new, old: jnp.where(finite, new, old), new_state,
          state.replace(step=state.step + 1),
      )
      skipped = 1.0 - finite.astype(jnp.float32)
    metrics = {
        "loss": loss,
        "skipped": skipped,
        "grad_norm": grad_norm,
        "param_norm": _tree_norm(params),
        "update_norm": _tree_norm(updates),
        "lr": schedule(state.step),
    }
    return new_state, metrics

  return train_step


def _masks_sampler(
    model: nn.Module,
    d: ml_collections.ConfigDict,
    *,
    num_classes: int,
    max_instances: int,
    return_trajectory: bool = False,
) -> Callable[..., Any]:
  """Returns a sampler of masks from encoder features.

  `sample_masks(variables, encoded, rng, steps, cond_map=None)` samples the
  analog bits of the images whose encoder output is `encoded` (only the
  decoder runs in the sampler's scan) and decodes them into int32 [b, m, m]
  (semantic, instance) maps, plus the trajectory when asked.
  """
  num_bits = 2 * d.bits_per_channel

  def sample_masks(variables, encoded, rng, steps, cond_map=None):
    m = model.mask_size

    def decode_fn(x_t, gamma_t, x0_sc):
      return model.apply(
          variables,
          x_t,
          gamma_t,
          encoded,
          self_cond_x0=x0_sc if d.self_cond else None,
          cond_map=cond_map,
          train=False,
          method="decode",
      )

    batch = jax.tree.leaves(encoded)[0].shape[0]
    result = sampler.sample(
        decode_fn,
        rng,
        (batch, m[0], m[1], num_bits),
        num_steps=steps,
        td=d.td,
        schedule=d.schedule,
        loss_type=d.loss_type,
        scale=d.bit_scale,
        softmax_groups=d.softmax_groups,
        self_cond=d.self_cond,
        sampler=d.sampler,
        return_trajectory=return_trajectory,
    )
    x0, trajectory = result if return_trajectory else (result, None)
    semantic, instance = analog_bits.analog_bits_to_mask(
        x0,
        bits_per_channel=d.bits_per_channel,
        num_classes=num_classes,
        max_instances=max_instances,
        code=d.bit_code,
    )
    if return_trajectory:
      return semantic, instance, trajectory
    return semantic, instance

  return sample_masks


def make_predict_fn(
    model: nn.Module,
    diff_config: ml_collections.ConfigDict,
    *,
    num_classes: int,
    max_instances: int,
    num_steps: int | None = None,
    return_trajectory: bool = False,
) -> Callable[..., Any]:
  """Returns `predict(params, batch_stats, image, rng) -> (semantic, instance)`.

  The image encoder runs once; only the decoder runs inside the sampler's
  `jax.lax.scan` over steps. Outputs are int32 [b, m, m] at mask resolution.
  Video models (`model.cond_channels > 0`) get the conditioning of a first
  frame (zero maps for every earlier frame); use `make_video_predict_fn` to
  walk a sequence.
  """
  steps = num_steps or diff_config.sample_steps
  sample_masks = _masks_sampler(
      model, diff_config, num_classes=num_classes,
      max_instances=max_instances, return_trajectory=return_trajectory)

  def predict(params, batch_stats, image, rng):
    variables = {"params": params, "batch_stats": batch_stats}
    encoded = model.apply(variables, image, train=False, method="encode")
    cond_map = None
    if model.cond_channels:
      m = model.mask_size
      frames = model.cond_channels // (2 * diff_config.bits_per_channel)
      zeros = jnp.zeros((image.shape[0], frames, m[0], m[1]), jnp.int32)
      cond_map = video_conditioning.conditioning_map(
          zeros, zeros, bits_per_channel=diff_config.bits_per_channel,
          scale=diff_config.bit_scale, code=diff_config.bit_code)
    return sample_masks(variables, encoded, rng, steps, cond_map)

  return predict


def make_video_predict_fn(
    model: nn.Module,
    diff_config: ml_collections.ConfigDict,
    *,
    num_classes: int,
    max_instances: int,
    proceeding_frames: tuple[int, ...],
    first_frame_steps: int | None = None,
    later_frame_steps: int | None = None,
) -> Callable[..., Any]:
  """Returns `predict(params, batch_stats, frames, rng)` for whole clips.

  It segments whole clips frame by frame, conditioning each frame on the
  model's own predictions for the frames `proceeding_frames` before it (zero
  maps before the first frame), so instance ids carry over. The encoder runs
  once over all frames of the batch; the first frame is sampled with
  `first_frame_steps` (`diffusion.sample_steps`) and the later ones with
  `later_frame_steps` (`diffusion.sample_steps_later`, fewer: the
  conditioning already says most of the answer) in a `jax.lax.scan` over
  frames that carries the last K predicted masks, so a clip is one compiled
  call per (batch, frame count) shape.

  Args on the returned function: frames float32 [b, T, H, W, 3] (T >= 1);
  rng a PRNG key; frame t uses key fold_in(rng, t).

  Returns:
    (semantic, instance), int32 [b, T, m, m].
  """
  d = diff_config
  k = video_conditioning.history_length(proceeding_frames)
  if not model.cond_channels or k == 0:
    raise ValueError(
        "make_video_predict_fn needs a model conditioned on earlier frames "
        "(config.input.proceeding_frames non-empty).")
  first = first_frame_steps or d.sample_steps
  later = later_frame_steps or d.get("sample_steps_later") or first
  sample_masks = _masks_sampler(
      model, d, num_classes=num_classes, max_instances=max_instances)

  def predict(params, batch_stats, frames, rng):
    variables = {"params": params, "batch_stats": batch_stats}
    b, t = frames.shape[:2]
    encoded = model.apply(
        variables, frames.reshape((b * t,) + frames.shape[2:]), train=False,
        method="encode")
    # [b * T, ...] -> [T, b, ...]: the scan walks the leading axis.
    encoded = jax.tree.map(
        lambda x: x.reshape((b, t) + x.shape[1:]).swapaxes(0, 1), encoded)
    m = model.mask_size
    empty = jnp.zeros((k, b, m[0], m[1]), jnp.int32)

    def frame(history, inputs, steps):
      enc_t, index = inputs
      sem_hist, inst_hist = history
      cond_map = video_conditioning.conditioning_map(
          video_conditioning.select_history(
              sem_hist, proceeding_frames).swapaxes(0, 1),
          video_conditioning.select_history(
              inst_hist, proceeding_frames).swapaxes(0, 1),
          bits_per_channel=d.bits_per_channel, scale=d.bit_scale,
          code=d.bit_code)
      semantic, instance = sample_masks(
          variables, enc_t, jax.random.fold_in(rng, index), steps, cond_map)
      history = (
          jnp.concatenate([sem_hist[1:], semantic[None]]),
          jnp.concatenate([inst_hist[1:], instance[None]]),
      )
      return history, (semantic, instance)

    first_enc = jax.tree.map(lambda x: x[0], encoded)
    history, (sem0, inst0) = frame((empty, empty), (first_enc, 0), first)
    rest_enc = jax.tree.map(lambda x: x[1:], encoded)
    _, (sems, insts) = jax.lax.scan(
        functools.partial(frame, steps=later), history,
        (rest_enc, jnp.arange(1, t, dtype=jnp.int32)))
    semantic = jnp.concatenate([sem0[None], sems]).swapaxes(0, 1)
    instance = jnp.concatenate([inst0[None], insts]).swapaxes(0, 1)
    return semantic, instance

  return predict
