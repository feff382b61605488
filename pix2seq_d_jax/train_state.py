"""Train state, optimizer, and the pure diffusion train step.

The model is built and the step jitted with its shardings by
`experiment.create`; samplers live in `inference.sampling`.

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

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pix2seq_d_jax import config_lib, gradient_clipping
from pix2seq_d_jax.diffusion import (
    analog_bits,
    losses,
    schedules,
    video_conditioning,
)

PyTree = Any
# AdamW's epsilon (optax's default), named because `applied_update` rebuilds
# the optimizer's direction from its state.
ADAM_EPS = 1e-8
# Whole-part remat (`encoder`, `decoder`, `both`: one `jax.checkpoint` around
# each part) or per-block remat of every ResNet, transformer and U-Net block
# (`blocks`: save nothing inside a block; `blocks_dots`: save the outputs of
# its matmuls and convs), mapped to the model's `remat_blocks` policy.
BLOCK_REMAT = {"blocks": "full", "blocks_dots": "dots"}
REMAT_CHOICES = ("none", "encoder", "decoder", "both", *BLOCK_REMAT)
# fold_in constant of the frame-dropout random stream of video models.
_FRAMES_DROPOUT_STREAM = 0x7F1D


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
    parts.append(
        gradient_clipping.clip_by_global_norm(opt_config.grad_clip_norm))
  parts.append(
      optax.adamw(
          schedule,
          b1=opt_config.b1,
          b2=opt_config.b2,
          eps=ADAM_EPS,
          weight_decay=opt_config.weight_decay,
          mask=_decay_mask,
      )
  )
  return optax.chain(*parts), schedule


def reseed(rng: jax.Array, prng_impl: str) -> jax.Array:
  """A key of kind `prng_impl` seeded by random bits of `rng`.

  Deterministic in `rng`; `rng` itself is returned when it already is of
  that kind.
  """
  if str(jax.random.key_impl(rng)) == prng_impl:
    return rng
  key_shape = jax.eval_shape(
      lambda: jax.random.key_data(jax.random.key(0, impl=prng_impl))).shape
  data = jax.random.bits(rng, key_shape, jnp.uint32)
  return jax.random.wrap_key_data(data, impl=prng_impl)


def make_init_fn(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    image_size: tuple[int, int],
    mask_size: tuple[int, int],
    num_bits: int,
    prng_impl: str | None = None,
) -> Callable[[jax.Array], TrainState]:
  """Returns `init(rng) -> TrainState` with boxed (logically named) params.

  `image_size` and `mask_size` are (height, width): the dummy inputs the
  model is initialised with.

  `prng_impl` (one of `config_lib.INIT_PRNG_IMPLS`) is the random-number
  generator the initialisers draw with: the key passed in seeds a key of
  that kind; None draws with the key's own kind. `unsafe_rbg` derives the
  per-array keys (flax folds each module's name into the key) with XLA's
  bit generator instead of threefry hashes; compiling the paper model's
  init on CPU then takes 15 instead of 30 s of CPU time (docs/speed.md).

  The params keep their `nn.Partitioned` boxes so that
  `nn.get_partition_spec(jax.eval_shape(init, rng))` yields the sharding of
  every leaf, optimizer state included; callers unbox after sharding.
  """

  if prng_impl is not None and prng_impl not in config_lib.INIT_PRNG_IMPLS:
    raise ValueError(f"prng_impl={prng_impl!r}: expected one of "
                     f"{config_lib.INIT_PRNG_IMPLS}")

  def init(rng: jax.Array) -> TrainState:
    if prng_impl is not None:
      rng = reseed(rng, prng_impl)
    image = jnp.zeros((1, *image_size, 3), jnp.float32)
    x_t = jnp.zeros((1, *mask_size, num_bits), jnp.float32)
    gamma = jnp.ones((1,), jnp.float32)
    kwargs = {}
    if model.self_cond:
      kwargs["self_cond_x0"] = jnp.zeros_like(x_t)
    if model.cond_channels:
      kwargs["cond_map"] = jnp.zeros(
          (1, *mask_size, model.cond_channels), jnp.float32
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


def _one_state(opt_state: PyTree, kind: type) -> Any:
  """The one `kind` (an optax state class) inside `opt_state`."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)]
  if len(found) != 1:
    raise ValueError(f"Expected one {kind.__name__} in the optimizer state "
                     f"of `make_optimizer`, found {len(found)}.")
  return found[0]


def _update_rule(opt_state: PyTree, *, b1: float, b2: float,
                 weight_decay: float, schedule: optax.Schedule
                 ) -> Callable[[jax.Array, jax.Array, jax.Array, bool],
                               jax.Array]:
  """`update(p, mu, nu, decayed)` of the last step, from its state."""
  adam = _one_state(opt_state, optax.ScaleByAdamState)
  lr = schedule(_one_state(opt_state, optax.ScaleByScheduleState).count - 1)
  count = adam.count

  def update(p, mu, nu, decayed):
    direction = (mu / (1 - b1**count)) / (
        jnp.sqrt(nu / (1 - b2**count)) + ADAM_EPS)
    if decayed and weight_decay:
      return -lr * (direction + weight_decay * p) / (1 - lr * weight_decay)
    return -lr * direction

  return update


def applied_update(params: PyTree, opt_state: PyTree, *, b1: float,
                   b2: float, weight_decay: float,
                   schedule: optax.Schedule) -> PyTree:
  """The update the last step added to `params`, rebuilt from the state.

  For the optimizer of `make_optimizer` (its `b1`, `b2`, `weight_decay`
  and `schedule`), from the state after the step: AdamW's direction
  a = m̂ / (sqrt(v̂) + eps) is a function of its moments and count, and
  the step set p = p' - lr (a + wd p') (weight decay on the masked leaves
  only), so the update p - p' is -lr (a + wd p) / (1 - lr wd), with lr the
  schedule at the count the step used. The log steps thus report the
  update's norm without a copy of the parameters taken before the step
  (which the step donates): on the paper model that copy was 360 MiB held
  through the log step, and computing the norm inside the step makes XLA
  copy parameters at every step. Equal to the difference of the
  parameters up to float32 rounding (tested).
  """
  adam = _one_state(opt_state, optax.ScaleByAdamState)
  update = _update_rule(opt_state, b1=b1, b2=b2, weight_decay=weight_decay,
                        schedule=schedule)
  return jax.tree.map(update, params, adam.mu, adam.nu, _decay_mask(params))


def applied_update_norm(
    params: PyTree, opt_state: PyTree, *, b1: float, b2: float,
    weight_decay: float, schedule: optax.Schedule,
    small_leaf_size: int = gradient_clipping.SMALL_LEAF_SIZE) -> jax.Array:
  """The global norm of `applied_update`, in few XLA kernels.

  As `gradient_clipping.global_norm` does for a tree: leaves of at most
  `small_leaf_size` elements are concatenated (with their moments; one
  group with weight decay, one without) and their update computed once;
  larger leaves one by one. XLA:CPU compiles a kernel per fusion: per
  leaf, the paper model's 679 leaves took 5.5 s to compile at start-up.
  """
  adam = _one_state(opt_state, optax.ScaleByAdamState)
  update = _update_rule(opt_state, b1=b1, b2=b2, weight_decay=weight_decay,
                        schedule=schedule)
  squares = [jnp.zeros((), jnp.float32)]
  small: dict[bool, list[tuple[jax.Array, ...]]] = {False: [], True: []}
  for p, mu, nu, decayed in zip(
      jax.tree.leaves(params), jax.tree.leaves(adam.mu),
      jax.tree.leaves(adam.nu), jax.tree.leaves(_decay_mask(params)),
      strict=True):
    if p.size <= small_leaf_size:
      small[decayed].append(tuple(
          jnp.ravel(x).astype(jnp.float32) for x in (p, mu, nu)))
    else:
      squares.append(jnp.sum(jnp.square(update(p, mu, nu, decayed))))
  for decayed, group in small.items():
    if group:
      p, mu, nu = (jnp.concatenate(parts) for parts in zip(*group, strict=True))
      squares.append(jnp.sum(jnp.square(update(p, mu, nu, decayed))))
  return jnp.sqrt(sum(squares))


def make_norms_fn(
    opt_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> Callable[[PyTree, PyTree, jax.Array], dict[str, jax.Array]]:
  """Returns `norms(params, opt_state, skipped)`, jitted, for log steps.

  The global norms of the parameters and of the update the last step
  applied (`applied_update_norm`, from the state after the step; zero for a
  step skipped as non-finite, `skipped` = 1, which applied nothing).
  Computing both inside every train step would cost two passes over the
  parameters and stop XLA fusing the update.
  """
  b1, b2 = float(opt_config.b1), float(opt_config.b2)
  weight_decay = float(opt_config.weight_decay)

  @jax.jit
  def norms(params: PyTree, opt_state: PyTree, skipped: jax.Array
            ) -> dict[str, jax.Array]:
    update_norm = applied_update_norm(
        params, opt_state, b1=b1, b2=b2, weight_decay=weight_decay,
        schedule=schedule)
    return {
        "param_norm": gradient_clipping.global_norm(params),
        "update_norm": jnp.where(skipped > 0, 0.0, update_norm),
    }

  return norms


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
    ema_every_steps: int = 1,
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
    remat: one of `REMAT_CHOICES`: which parts (`encoder`, `decoder`,
      `both`) or blocks (`blocks`, `blocks_dots`) recompute their
      activations in the backward pass instead of storing them.
    frames_dropout: video models (`model.cond_channels > 0`) read the
      ground-truth masks of the conditioning frames from the batch
      (`cond_semantic`, `cond_instance` int32 [b, F, m, m]); each frame is
      replaced by a zero map with this probability.
    ema_every_steps: update the EMA only on steps k, 2k, ... with decay
      `ema_decay**k` (the same time constant): skipped steps neither read
      nor write the EMA tree. 1 updates it every step (the paper's).

  Returns:
    The step function; jit it with donated state.
  """
  d = diff_config
  bits = d.bits_per_channel
  scale = analog_bits.channel_scales(
      d.bit_scale, d.get("instance_bit_scale"), bits)
  if remat not in REMAT_CHOICES:
    raise ValueError(f"remat={remat!r}; expected one of {REMAT_CHOICES}")
  if (not isinstance(ema_every_steps, int) or isinstance(ema_every_steps, bool)
      or ema_every_steps < 1):
    raise ValueError(
        f"ema_every_steps={ema_every_steps!r}; expected an int >= 1")
  if remat in BLOCK_REMAT:
    # Same parameters, so the state and checkpoints do not depend on it.
    model = model.clone(remat_blocks=BLOCK_REMAT[remat])

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
            scale=scale, softmax_groups=d.softmax_groups,
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
        scale=scale,
        softmax_groups=d.softmax_groups,
        eps_weighted=d.get("eps_loss_weighted", False),
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
        sem, batch["cond_instance"], bits_per_channel=bits, scale=scale,
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
    x0 = (2.0 * x0_bits.astype(jnp.float32) - 1.0) * scale
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
    # Named so that a profile can tell the update's ops from the model's
    # (`benchmark.op_categories`).
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      if ema_every_steps == 1:
        ema_params = jax.tree.map(
            lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
            state.ema_params,
            params,
        )
      else:
        # Every k-th step with decay**k: the same time constant, and
        # lax.cond keeps the other steps from touching the EMA tree.
        decay_k = ema_decay**ema_every_steps

        def update_ema(operands):
          ema, new_params = operands
          return jax.tree.map(
              lambda e, p: decay_k * e + (1.0 - decay_k) * p, ema, new_params)

        ema_params = jax.lax.cond(
            (state.step + 1) % ema_every_steps == 0,
            update_ema,
            lambda operands: operands[0],
            (state.ema_params, params),
        )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
    )
    grad_norm = gradient_clipping.global_norm(grads)
    skipped = jnp.zeros((), jnp.float32)
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      new_state = jax.tree.map(
          lambda new, old: jnp.where(finite, new, old), new_state,
          state.replace(step=state.step + 1),
      )
      skipped = 1.0 - finite.astype(jnp.float32)
    # The gradient norm is the one clipping computes (the same expression:
    # XLA merges the two).
    # Parameter and update norms are extra passes over every parameter,
    # which the loop needs only at log steps: `param_and_update_norms`.
    metrics = {
        "loss": loss,
        "skipped": skipped,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
    }
    return new_state, metrics

  return train_step
