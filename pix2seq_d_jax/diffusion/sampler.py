"""Iterative refinement of analog bits: the DDIM / DDPM samplers of Pix2Seq-D.

Inference follows Algorithm 2 of the Pix2Seq-D paper: start from Gaussian
noise m_T, and at each of S steps let the decoder predict the clean analog
bits x0 (m_pred) from the current m_t at time t_now = 1 - s / S, clip it to
[-scale, scale], and move m to t_next = max(1 - (s + 1 + td) / S, 0). The
time difference `td` (asymmetric time intervals, paper's recipes: 1 or 2)
makes the decoder look at a slightly less noisy state than the one it is in.
The image encoder is not part of the loop: the caller closes `decode_fn`
over the encoder's features, so only the decoder runs per step, and all
steps are one `jax.lax.scan`.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pix2seq_d_jax.diffusion import losses, schedules

SAMPLERS = ('ddim', 'ddpm')

DecodeFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Floor of 1 - gamma(t_now) in divisions: t_now >= 1 / S keeps it positive for
# every shipped schedule, but a float32 gamma can round to exactly 1.
_MIN_NOISE = 1e-12


def sample(
    decode_fn: DecodeFn,
    rng: jax.Array,
    shape: tuple[int, int, int, int],
    *,
    num_steps: int,
    td: float = 0.0,
    schedule: str = 'cosine',
    schedule_kwargs: Mapping[str, Any] | None = None,
    loss_type: str = 'x_softmax_xent',
    scale: float | jax.typing.ArrayLike = 0.1,
    softmax_groups: int = 2,
    self_cond: bool = False,
    sampler: str = 'ddim',
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  """Samples analog bits by iterative denoising.

  Random numbers: `rng` is split into (init_key, step_key); the starting
  noise is normal(init_key, shape) and the DDPM noise of step s is
  normal(fold_in(step_key, s), shape).

  Update from t_now to t_next, with x0 the clipped prediction and
  eps = (x - sqrt(g_now) * x0) / sqrt(1 - g_now):
    ddim: x = sqrt(g_next) * x0 + sqrt(1 - g_next) * eps.
    ddpm (ancestral step, the Analog Bits reference form): with
      alpha = g_now / g_next and
      sigma2 = (1 - g_next) / (1 - g_now) * (1 - alpha),
      x = (x - (1 - alpha) / sqrt(1 - g_now) * eps) / sqrt(alpha)
          + sqrt(sigma2) * z when t_next > 0, else x = x0.
      The mean is computed in the algebraically equal form
      sqrt(g_next) * x0 + sqrt(alpha) * (1 - g_next) / sqrt(1 - g_now) * eps,
      which is stable in float32 when alpha is tiny (the first steps).

  Args:
    decode_fn: (x_t float32 [b, h, w, n], gamma float32 [b], self_cond_x0
      float32 [b, h, w, n]) -> raw output float [b, h, w, c] with c =
      losses.num_output_channels(loss_type, n, softmax_groups).
    rng: PRNG key.
    shape: (b, h, w, n), static.
    num_steps: S >= 1, static.
    td: time difference >= 0 (Python number).
    schedule: one of schedules.SCHEDULES.
    schedule_kwargs: start / end / tau for `schedules.gamma`.
    loss_type: one of losses.LOSS_TYPES; how the output is read.
    scale: input scaling b of the analog bits; x0 is clipped to it (a
      [n] vector gives each bit its own b, `analog_bits.channel_scales`).
    softmax_groups: groups of the 'x_softmax_xent' type.
    self_cond: pass the previous step's x0 (zeros at the first step) as
      self_cond_x0; otherwise zeros always.
    sampler: one of SAMPLERS.
    return_trajectory: also return the per-step states.

  Returns:
    x0 float32 [b, h, w, n], the last step's clipped x0 estimate (threshold
    at 0 to get bits); with return_trajectory, (x0, {'x_t': [S, b, h, w, n]
    the state fed to the decoder at each step (x_t[0] is the starting noise),
    'x0': [S, b, h, w, n] the clipped x0 estimate of each step}).

  Raises:
    ValueError: bad num_steps, td, sampler, shape, loss type or schedule, or
      a decode_fn output whose x0 estimate does not have `shape`.
  """
  if (not isinstance(num_steps, int) or isinstance(num_steps, bool)
      or num_steps < 1):
    raise ValueError(f'sample: num_steps={num_steps!r} must be an int >= 1.')
  if isinstance(td, (int, float)) and not td >= 0:
    raise ValueError(f'sample: td={td!r} must be >= 0.')
  if sampler not in SAMPLERS:
    raise ValueError(f'sample: sampler={sampler!r} is unknown; expected one '
                     f'of {SAMPLERS}.')
  shape = tuple(shape)
  if len(shape) != 4:
    raise ValueError(f'sample: shape={shape} must be (b, h, w, n).')
  # Fail on a bad schedule or loss type before tracing the loop.
  schedule_kwargs = dict(schedule_kwargs or {})
  schedules.gamma(0.5, schedule, **schedule_kwargs)
  losses.num_output_channels(loss_type, shape[-1], softmax_groups)

  batch = shape[0]
  init_key, step_key = jax.random.split(rng)
  x_init = jax.random.normal(init_key, shape, jnp.float32)
  zeros = jnp.zeros(shape, jnp.float32)

  def step(carry, s):
    x, x0_prev = carry
    s_float = s.astype(jnp.float32)
    t_now = 1.0 - s_float / num_steps
    t_next = jnp.maximum(1.0 - (s_float + 1.0 + td) / num_steps, 0.0)
    g_now = schedules.gamma(t_now, schedule, **schedule_kwargs)
    g_next = schedules.gamma(t_next, schedule, **schedule_kwargs)
    g_batch = jnp.full((batch,), g_now, jnp.float32)
    out = decode_fn(x, g_batch, x0_prev if self_cond else zeros)
    x0 = losses.predict_x0(out, x_t=x, gamma_t=g_batch, loss_type=loss_type,
                           scale=scale, softmax_groups=softmax_groups)
    if x0.shape != shape:
      raise ValueError(f'sample: decode_fn output {out.shape} gives an x0 '
                       f'estimate of shape {x0.shape}, expected {shape}.')
    x0 = jnp.clip(x0, -scale, scale)
    noise_now = jnp.maximum(1.0 - g_now, _MIN_NOISE)
    eps = (x - jnp.sqrt(g_now) * x0) / jnp.sqrt(noise_now)
    if sampler == 'ddim':
      x_next = jnp.sqrt(g_next) * x0 + jnp.sqrt(1.0 - g_next) * eps
    else:
      alpha = g_now / g_next
      sigma2 = jnp.maximum((1.0 - g_next) / noise_now * (1.0 - alpha), 0.0)
      z = jax.random.normal(jax.random.fold_in(step_key, s),
                            shape, jnp.float32)
      # The reference's mean (x - (1 - alpha) / sqrt(1 - g_now) * eps) /
      # sqrt(alpha) rewritten with x = sqrt(g_now) x0 + sqrt(1 - g_now) eps:
      # the same value, but without cancelling two O(1) terms and dividing
      # by sqrt(alpha) ~ 1e-4 at the first step, which costs float32 ~1e-3.
      mean = jnp.sqrt(g_next) * x0 + jnp.sqrt(alpha) * (
          1.0 - g_next) / jnp.sqrt(noise_now) * eps
      x_ancestral = mean + jnp.sqrt(sigma2) * z
      x_next = jnp.where(t_next > 0, x_ancestral, x0)
    return (x_next, x0), (x, x0)

  (_, x0_final), (xs, x0s) = jax.lax.scan(
      step, (x_init, zeros), jnp.arange(num_steps, dtype=jnp.int32))
  if return_trajectory:
    return x0_final, {'x_t': xs, 'x0': x0s}
  return x0_final
