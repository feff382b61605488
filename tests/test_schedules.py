"""Tests of pix2seq_d_jax.diffusion.schedules: gamma(t) and forward noise."""

import math

import numpy as np
import pytest

from pix2seq_d_jax.diffusion import schedules

_VARIANTS = [
    ('cosine', {}),
    ('cosine', {'start': 0.2, 'end': 1.0, 'tau': 1.5}),
    ('sigmoid', {}),
    ('sigmoid', {'start': 0.0, 'end': 3.0, 'tau': 0.5}),
    ('linear', {}),
]


@pytest.mark.parametrize('schedule,kwargs', _VARIANTS)
def test_endpoints_and_monotone(schedule, kwargs):
  t = np.linspace(0.0, 1.0, 101, dtype=np.float32)
  g = np.asarray(schedules.gamma(t, schedule, **kwargs))
  assert g.dtype == np.float32 and g.shape == t.shape
  np.testing.assert_allclose(g[0], 1.0, atol=1e-6)
  assert g[-1] < 1e-6
  assert g.min() >= 1e-9 and g.max() <= 1.0
  assert np.all(np.diff(g) < 0)


def test_cosine_simple_closed_form():
  for t in (0.0, 0.25, 0.5, 0.9, 1.0):
    expected = math.cos((t + 0.0002) / 1.00025 * math.pi / 2)**2
    np.testing.assert_allclose(
        schedules.gamma(t), expected, rtol=1e-5, atol=1e-9)
  # At t = 0.5 the signal is very nearly half the variance.
  np.testing.assert_allclose(schedules.gamma(0.5), 0.5, atol=1e-3)


def test_parameterised_forms_hand_values():
  # Cosine start=0, end=1, tau=1 at t=0.5: (0 - cos(pi/4)**2) / (0 - 1) = 0.5.
  np.testing.assert_allclose(
      schedules.gamma(0.5, 'cosine', start=0.0, end=1.0, tau=1.0), 0.5,
      atol=1e-6)
  # Sigmoid defaults at t=0.5: sigmoid(0) = 0.5, symmetric range -> 0.5.
  np.testing.assert_allclose(schedules.gamma(0.5, 'sigmoid'), 0.5, atol=1e-6)
  sig = lambda u: 1 / (1 + math.exp(-u))
  expected = (sig(3) - sig(-1.5)) / (sig(3) - sig(-3))
  np.testing.assert_allclose(schedules.gamma(0.25, 'sigmoid'), expected,
                             rtol=1e-6)
  np.testing.assert_allclose(schedules.gamma(0.3, 'linear'), 0.7, rtol=1e-6)


def test_errors_name_choices():
  with pytest.raises(ValueError, match='sigmoid'):
    schedules.gamma(0.5, 'exponential')
  with pytest.raises(ValueError, match='start < end'):
    schedules.gamma(0.5, 'sigmoid', start=1.0, end=1.0)
  with pytest.raises(ValueError, match='linear'):
    schedules.gamma(0.5, 'linear', tau=2.0)


def test_add_noise_matches_numpy():
  rng = np.random.RandomState(0)
  x0 = rng.choice([-0.1, 0.1], size=(3, 2, 2, 4)).astype(np.float32)
  eps = rng.randn(3, 2, 2, 4).astype(np.float32)
  g = np.array([0.9, 0.5, 0.01], np.float32)
  expected = (np.sqrt(g)[:, None, None, None] * x0 +
              np.sqrt(1 - g)[:, None, None, None] * eps)
  np.testing.assert_allclose(schedules.add_noise(x0, g, eps), expected,
                             rtol=1e-6)
  with pytest.raises(ValueError, match='gamma_t'):
    schedules.add_noise(x0, g[:2], eps)
