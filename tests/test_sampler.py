"""Tests of pix2seq_d_jax.diffusion.sampler against an unrolled numpy loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pix2seq_d_jax.diffusion import analog_bits, sampler, schedules

_SHAPE = (2, 3, 3, 4)  # 4 bits: 2 softmax groups of 2 bits -> 8 logits.
_SCALE = 0.1
_RNG = np.random.RandomState(0)
_A = _RNG.randn(4, 8).astype(np.float32) * 10
_B = _RNG.randn(4, 8).astype(np.float32) * 10
_C = _RNG.randn(8).astype(np.float32)


def _decode(x, g, sc):
  """A fixed decoder whose output depends on all three inputs."""
  return (jnp.asarray(x) @ _A + jnp.asarray(sc) @ _B +
          jnp.asarray(g)[:, None, None, None] * _C)


def _np_gamma(t, schedule):
  """gamma(t) in float64, rounded to float32 as the sampler sees it.

  Near t = 0, gamma is within a few float32 ulps of 1, so 1 - gamma (and the
  DDIM update that divides by its square root) depends on the rounding; the
  reference uses the float32 value to compare updates, not roundings.
  """
  if schedule == 'linear':
    exact = min(max(1.0 - t, 1e-9), 1.0)
  else:
    exact = math.cos((t + 0.0002) / 1.00025 * math.pi / 2)**2
  rounded = float(schedules.gamma(np.float32(t), schedule))
  np.testing.assert_allclose(rounded, exact, rtol=1e-6, atol=2e-7)
  return rounded


def _np_predict_x0(logits):
  """Expected analog bits under each 4-way group softmax, numpy float64."""
  z = np.asarray(logits, np.float64).reshape(_SHAPE[:3] + (2, 4))
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p_one = np.stack([p[..., 1] + p[..., 3], p[..., 2] + p[..., 3]], axis=-1)
  return ((2 * p_one - 1) * _SCALE).reshape(_SHAPE)


def _np_sample(rng, num_steps, td, self_cond, kind, schedule='cosine'):
  """Paper Algorithm 2 unrolled in numpy, with the documented rng scheme."""
  init_key, step_key = jax.random.split(rng)
  x = np.asarray(jax.random.normal(init_key, _SHAPE), np.float64)
  x0_prev = np.zeros(_SHAPE)
  for s in range(num_steps):
    t_now = 1 - s / num_steps
    t_next = max(1 - (s + 1 + td) / num_steps, 0.0)
    g_now, g_next = _np_gamma(t_now, schedule), _np_gamma(t_next, schedule)
    sc = x0_prev if self_cond else np.zeros(_SHAPE)
    out = _decode(x.astype(np.float32), np.full(_SHAPE[0], g_now, np.float32),
                  sc.astype(np.float32))
    x0 = np.clip(_np_predict_x0(out), -_SCALE, _SCALE)
    eps = (x - math.sqrt(g_now) * x0) / math.sqrt(1 - g_now)
    if kind == 'ddim':
      x = math.sqrt(g_next) * x0 + math.sqrt(1 - g_next) * eps
    elif t_next > 0:
      # The reference's own form of the mean; float64 keeps it accurate.
      alpha = g_now / g_next
      sigma2 = (1 - g_next) / (1 - g_now) * (1 - alpha)
      z = np.asarray(jax.random.normal(jax.random.fold_in(step_key, s),
                                       _SHAPE), np.float64)
      x = (x - (1 - alpha) / math.sqrt(1 - g_now) * eps) / math.sqrt(
          alpha) + math.sqrt(sigma2) * z
    else:
      x = x0
    x0_prev = x0
  return x0


@pytest.mark.parametrize('schedule', ['cosine', 'linear'])
def test_one_ddim_step_matches_numpy(schedule):
  rng = jax.random.PRNGKey(3)
  x0_final, traj = sampler.sample(
      _decode, rng, _SHAPE, num_steps=2, schedule=schedule,
      scale=_SCALE, return_trajectory=True)
  assert traj['x_t'].shape == (2,) + _SHAPE
  x_start = np.asarray(traj['x_t'][0], np.float64)
  g_now, g_next = _np_gamma(1.0, schedule), _np_gamma(0.5, schedule)
  out = _decode(x_start.astype(np.float32),
                np.full(_SHAPE[0], g_now, np.float32), np.zeros(_SHAPE))
  x0 = _np_predict_x0(out)
  eps = (x_start - math.sqrt(g_now) * x0) / math.sqrt(1 - g_now)
  x_next = math.sqrt(g_next) * x0 + math.sqrt(1 - g_next) * eps
  np.testing.assert_allclose(traj['x0'][0], x0, atol=1e-6)
  np.testing.assert_allclose(traj['x_t'][1], x_next, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(x0_final, traj['x0'][1])


@pytest.mark.parametrize('kind', sampler.SAMPLERS)
@pytest.mark.parametrize('td', [0.0, 1.0])
@pytest.mark.parametrize('self_cond', [False, True])
def test_scan_matches_unrolled_loop(kind, td, self_cond):
  rng = jax.random.PRNGKey(7)
  got = sampler.sample(_decode, rng, _SHAPE, num_steps=4, td=td,
                       scale=_SCALE, self_cond=self_cond, sampler=kind)
  expected = _np_sample(rng, 4, td, self_cond, kind)
  assert got.dtype == jnp.float32 and got.shape == _SHAPE
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_self_cond_passes_previous_x0():
  # With the 'x' reading, x0 = clip(self_cond_x0 + 0.03): it accumulates only
  # if the previous step's x0 comes back in.
  decode = lambda x, g, sc: sc + 0.03
  for self_cond, expected in ((True, [0.03, 0.06, 0.09, 0.1]),
                              (False, [0.03] * 4)):
    _, traj = sampler.sample(decode, jax.random.PRNGKey(0), _SHAPE,
                             num_steps=4, loss_type='x', scale=_SCALE,
                             self_cond=self_cond, return_trajectory=True)
    np.testing.assert_allclose(traj['x0'][:, 0, 0, 0, 0], expected,
                               rtol=1e-6)


def _perfect_decoder(seed):
  """A random (semantic, instance) mask and a decoder sure of it."""
  rng = np.random.RandomState(seed)
  semantic = rng.randint(0, 134, size=(2, 4, 4))
  instance = rng.randint(0, 101, size=(2, 4, 4))
  logits = np.concatenate([np.eye(256)[semantic], np.eye(256)[instance]],
                          axis=-1).astype(np.float32) * 20.0
  decode = lambda x, g, sc: jnp.asarray(logits) + 0.0 * x.sum()
  return semantic, instance, decode


@pytest.mark.parametrize('kind', sampler.SAMPLERS)
def test_perfect_decoder_recovers_mask(kind):
  semantic, instance, decode = _perfect_decoder(4)

  @jax.jit
  def run(key):
    return sampler.sample(decode, key, (2, 4, 4, 16), num_steps=5, td=1.0,
                          sampler=kind)

  sem, inst = analog_bits.analog_bits_to_mask(
      run(jax.random.PRNGKey(1)), num_classes=134, max_instances=101)
  np.testing.assert_array_equal(sem, semantic)
  np.testing.assert_array_equal(inst, instance)


@pytest.mark.parametrize('td', [4.0, 49.0])
def test_td_of_steps_minus_one_refines_the_clean_estimate(td):
  """td >= S - 1: every update lands on t = 0 (the synthetic recipe).

  The state after step s is then that step's clipped x0 estimate exactly,
  so step s + 1 re-denoises it, told the time t_now = 1 - (s + 1) / S.
  """
  _, traj = sampler.sample(_decode, jax.random.PRNGKey(3), _SHAPE,
                           num_steps=5, td=td, return_trajectory=True,
                           scale=_SCALE)
  # gamma(0) of the cosine schedule is 1 - 1e-7, so t = 0 keeps
  # sqrt(1 - gamma(0)) = 3.1e-4 of the noise estimate: the state is the clean
  # estimate up to ~1e-3, against O(1) for any state still at t > 0.
  floor = math.sqrt(1.0 - float(schedules.gamma(np.float32(0.0), 'cosine')))
  eps_max = float(np.abs(traj['x_t'][0]).max()) + 1.0
  np.testing.assert_allclose(traj['x_t'][1:], traj['x0'][:-1], rtol=0,
                             atol=floor * eps_max)
  assert float(np.abs(traj['x_t'][0] - traj['x0'][0]).max()) > 0.5


def test_per_channel_scale_clips_and_recovers_each_channel():
  """An instance_bit_scale: x0 lies in [-b, b] of its own channel."""
  semantic, instance, decode = _perfect_decoder(5)
  scale = analog_bits.channel_scales(0.1, 1.0, 8)
  x0, traj = sampler.sample(decode, jax.random.PRNGKey(2), (2, 4, 4, 16),
                            num_steps=3, td=1.0, scale=scale,
                            return_trajectory=True)
  np.testing.assert_allclose(np.abs(np.asarray(x0)),
                             np.broadcast_to(scale, x0.shape), rtol=1e-5)
  assert float(np.abs(traj['x0'][..., :8]).max()) <= 0.1 + 1e-6
  sem, inst = analog_bits.analog_bits_to_mask(x0, num_classes=134,
                                              max_instances=101)
  np.testing.assert_array_equal(sem, semantic)
  np.testing.assert_array_equal(inst, instance)


def test_bad_arguments():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match='num_steps'):
    sampler.sample(_decode, key, _SHAPE, num_steps=0)
  with pytest.raises(ValueError, match='td'):
    sampler.sample(_decode, key, _SHAPE, num_steps=2, td=-1.0)
  with pytest.raises(ValueError, match='ddpm'):
    sampler.sample(_decode, key, _SHAPE, num_steps=2, sampler='euler')
  with pytest.raises(ValueError, match='expected'):
    sampler.sample(lambda x, g, sc: jnp.zeros(_SHAPE[:3] + (16,)), key,
                   _SHAPE, num_steps=2)
