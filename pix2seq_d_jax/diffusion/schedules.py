"""Noise schedules gamma(t) of continuous-time diffusion, and the forward noise.

Time t runs over [0, 1]; gamma(t) is the signal level, from about 1 at t = 0
(clean) to about 0 at t = 1 (pure noise), and the noisy sample is
x_t = sqrt(gamma) * x_0 + sqrt(1 - gamma) * eps. The cosine schedule of
improved DDPM (Nichol & Dhariwal) is the default in Pix2Seq-D for training
and sampling; the parameterised cosine and sigmoid schedules follow Chen 2023,
"On the importance of noise scheduling for diffusion models"; the linear one
is gamma = 1 - t. The parameterised forms are clipped to [1e-9, 1] so that
sqrt and divisions downstream stay finite.
"""

import math

import jax
import jax.numpy as jnp

SCHEDULES = ('cosine', 'linear', 'sigmoid')

_CLIP_MIN = 1e-9
# Offsets of the simple cosine form (improved DDPM): they keep gamma(0) just
# below 1 and gamma(1) just above 0.
_COSINE_NS = 0.0002
_COSINE_DS = 0.00025


def _check_range(schedule: str, start: float, end: float, tau: float) -> None:
  if not start < end:
    raise ValueError(f'gamma: schedule={schedule!r} needs start < end, got '
                     f'start={start}, end={end}.')
  if not tau > 0:
    raise ValueError(f'gamma: schedule={schedule!r} needs tau > 0, got '
                     f'tau={tau}.')


def gamma(t: jax.typing.ArrayLike, schedule: str = 'cosine', *,
          start: float | None = None, end: float | None = None,
          tau: float | None = None) -> jax.Array:
  """Signal level gamma(t) of a noise schedule.

  Args:
    t: float [...] times in [0, 1].
    schedule: one of SCHEDULES. 'cosine' with none of start/end/tau is the
      simple form cos(((t + 0.0002) / 1.00025) * pi / 2)**2; with any of them
      it is the parameterised form (defaults start=0, end=1, tau=1). 'sigmoid'
      defaults to start=-3, end=3, tau=1. 'linear' is 1 - t and takes no
      parameters.
    start: Python float, schedule parameter (see above).
    end: Python float, schedule parameter (see above).
    tau: Python float > 0, temperature of the parameterised forms.

  Returns:
    float32 with t's shape, decreasing in t.

  Raises:
    ValueError: unknown schedule, parameters given to 'linear', start >= end
      or tau <= 0.
  """
  t = jnp.asarray(t, jnp.float32)
  has_params = any(v is not None for v in (start, end, tau))
  if schedule == 'cosine' and not has_params:
    return jnp.cos((t + _COSINE_NS) / (1 + _COSINE_DS) * math.pi / 2)**2
  if schedule == 'cosine':
    start = 0.0 if start is None else float(start)
    end = 1.0 if end is None else float(end)
    tau = 1.0 if tau is None else float(tau)
    _check_range(schedule, start, end, tau)
    # cos(pi / 2) is a hair below 0 in float32, and a negative base to a
    # fractional power is NaN.
    cos_pow = lambda u: jnp.maximum(jnp.cos(u * math.pi / 2), 0.0)**(2 * tau)
    v_start = max(math.cos(start * math.pi / 2), 0.0)**(2 * tau)
    v_end = max(math.cos(end * math.pi / 2), 0.0)**(2 * tau)
    out = (v_end - cos_pow(t * (end - start) + start)) / (v_end - v_start)
    return jnp.clip(out, _CLIP_MIN, 1.0)
  if schedule == 'sigmoid':
    start = -3.0 if start is None else float(start)
    end = 3.0 if end is None else float(end)
    tau = 1.0 if tau is None else float(tau)
    _check_range(schedule, start, end, tau)
    sig = lambda u: 1.0 / (1.0 + math.exp(-u))
    v_start, v_end = sig(start / tau), sig(end / tau)
    out = (v_end - jax.nn.sigmoid((t * (end - start) + start) / tau)) / (
        v_end - v_start)
    return jnp.clip(out, _CLIP_MIN, 1.0)
  if schedule == 'linear':
    if has_params:
      raise ValueError(f'gamma: schedule=\'linear\' takes no start/end/tau, '
                       f'got start={start}, end={end}, tau={tau}.')
    return jnp.clip(1.0 - t, _CLIP_MIN, 1.0)
  raise ValueError(f'gamma: schedule={schedule!r} is unknown; expected one of '
                   f'{SCHEDULES}.')


def add_noise(x0: jax.typing.ArrayLike, gamma_t: jax.typing.ArrayLike,
              eps: jax.typing.ArrayLike) -> jax.Array:
  """The forward process: x_t = sqrt(gamma) * x0 + sqrt(1 - gamma) * eps.

  Args:
    x0: float32 [b, ...] clean analog bits, e.g. [b, h, w, c].
    gamma_t: float32 [b] (one signal level per example) or a scalar.
    eps: float32, x0's shape, standard normal noise.

  Returns:
    float32, x0's shape.

  Raises:
    ValueError: gamma_t is neither a scalar nor [b], or eps's shape differs.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  gamma_t = jnp.asarray(gamma_t, jnp.float32)
  if eps.shape != x0.shape:
    raise ValueError(f'add_noise: eps shape {eps.shape} != x0 shape '
                     f'{x0.shape}.')
  if gamma_t.ndim == 1 and x0.ndim >= 1 and gamma_t.shape[0] == x0.shape[0]:
    gamma_t = gamma_t.reshape((-1,) + (1,) * (x0.ndim - 1))
  elif gamma_t.ndim != 0:
    raise ValueError(f'add_noise: gamma_t shape {gamma_t.shape} must be [b] '
                     f'with b = {x0.shape[:1]} or a scalar.')
  return jnp.sqrt(gamma_t) * x0 + jnp.sqrt(1.0 - gamma_t) * eps
