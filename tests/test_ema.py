"""Tests of `ema_every_steps`: the EMA updated every k steps with decay**k."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pix2seq_d_jax import config_lib, experiment, train_state
from tests.test_train_state import MASK, _batch, _setup, _tiny_config

DECAY = 0.9
STEPS = 3


def _run(ema_every_steps):
  """The initial state, the states after each of `STEPS` steps, the step.

  The step skips non-finite updates, so that it also serves the
  skipped-step test (one compile fewer).
  """
  config = _tiny_config()
  config.ema_every_steps = ema_every_steps
  _, state, step = _setup(config, ema_decay=DECAY, skip_nonfinite=True)
  states = [state]
  for i in range(STEPS):
    state, _ = step(state, _batch(seed=i), jax.random.key(i))
    states.append(state)
  return states, step


def _assert_close(actual, expected):
  # float32 against a float64 reference: atol covers the few entries that
  # cancel to ~1e-5 (params are ~0.1), where rtol alone asks for more
  # than float32 has.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
      actual, expected)


def _ema(decay, ema, params):
  """`decay * ema + (1 - decay) * params` in NumPy float64."""
  return jax.tree.map(
      lambda e, p: decay * np.asarray(e, np.float64)
      + (1 - decay) * np.asarray(p, np.float64), ema, params)


@pytest.fixture(scope="module")
def every_third_step():
  return _run(3)


def test_every_third_step_updates_with_the_compounded_decay(
    every_third_step):
  # The k = 1 path is the per-step EMA unchanged (checked against
  # 0.5 e + 0.5 p in test_train_state); here the compounded one, against
  # NumPy, and nothing in between.
  states, _ = every_third_step
  e0 = states[0].ema_params
  for state in states[1:3]:  # Steps 1 and 2: the EMA is not touched.
    jax.tree.map(np.testing.assert_array_equal, state.ema_params, e0)
  _assert_close(states[3].ema_params, _ema(DECAY**3, e0, states[3].params))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         states[3].ema_params, e0)
  assert any(jax.tree.leaves(changed))
  # The params really moved, so the comparison is not of constants.
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       states[0].params, states[3].params)
  assert any(jax.tree.leaves(moved))
  assert int(states[3].step) == STEPS


def test_skipped_nonfinite_step_keeps_the_ema_on_an_update_step(
    every_third_step):
  states, step = every_third_step
  # After 2 steps, the 3rd is an EMA step for k = 3.
  state = states[2]
  bad = dict(_batch(),  # float32, not weak: the same compiled step.
             loss_weight=jnp.full((2, MASK, MASK), jnp.nan, jnp.float32))
  skipped, metrics = step(state, bad, jax.random.key(2))
  assert float(metrics["skipped"]) == 1.0 and int(skipped.step) == 3
  for field in ("ema_params", "params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(skipped, field),
                 getattr(state, field))
  # The same step with a finite batch does update it (the run's step 3).
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         states[3].ema_params, state.ema_params)
  assert any(jax.tree.leaves(changed))


@pytest.mark.parametrize("value", [0, -1, True, 2.0])
def test_make_train_step_rejects_a_bad_interval(value):
  config = _tiny_config()
  config.input.batch_size = 2
  exp = experiment.create(config, total_steps=10)
  with pytest.raises(ValueError, match="ema_every_steps"):
    train_state.make_train_step(
        exp.model, exp.tx, exp.lr_schedule, config.diffusion,
        ema_decay=DECAY, ema_every_steps=value)


def test_validate_rejects_a_zero_interval_naming_the_field():
  config = importlib.import_module("configs.synthetic").get_config()
  config_lib.validate(config)  # The default (1) is valid.
  config.ema_every_steps = 0
  with pytest.raises(config_lib.ConfigError, match="ema_every_steps"):
    config_lib.validate(config)
