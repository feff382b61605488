"""The op-category breakdown: HLO classification and the profile join."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pix2seq_d_jax import op_profile


def _program():
  """A conv + dense model's gradient step with a named optimizer update."""

  def loss(w, v, x):
    y = jax.nn.relu(jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return jnp.sum((y.reshape(2, -1) @ v) ** 2)

  def step(w, v, x):
    gw, gv = jax.grad(loss, argnums=(0, 1))(w, v, x)
    with jax.named_scope("optimizer"):
      return w - 0.1 * jnp.sign(gw), v - 0.1 * jnp.sign(gv)

  args = (jnp.ones((3, 3, 8, 16)), jnp.ones((16 * 16 * 16, 4)),
          jnp.ones((2, 16, 16, 8)))
  return jax.jit(step).lower(*args).compile(), args


def test_categories_of_a_gradient_step():
  compiled, _ = _program()
  categories = op_profile.op_categories(compiled.as_text(), batch_size=2)
  kinds = set(categories.values())
  # The input x needs no gradient: one forward and one weight-gradient
  # convolution; the dense layer and its two gradients are matmuls.
  assert {"conv forward", "conv weight-grad", "matmul",
          "optimizer"} <= kinds
  assert "conv input-grad" not in kinds
  assert sum(v == "conv forward" for v in categories.values()) == 1
  assert sum(v == "conv weight-grad" for v in categories.values()) == 1
  assert set(kinds) <= set(op_profile.CATEGORIES)


def test_input_gradient_convolution_is_told_from_the_weight_gradient():
  def loss(x, w):
    return jnp.sum(jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))).compile()
  kinds = list(op_profile.op_categories(compiled.as_text(), 2).values())
  assert kinds.count("conv input-grad") == 1
  assert kinds.count("conv weight-grad") == 1


def test_shares_sum_per_category_and_ignore_unknown_names():
  categories = {"a": "matmul", "b": "matmul", "c": "other"}
  shares = op_profile.category_shares(
      categories, {"a": 1.0, "b": 2.0, "c": 1.0, "python_event": 50.0})
  assert shares["seconds"]["matmul"] == 3.0
  assert shares["total_s"] == 4.0
  assert shares["share"]["matmul"] == pytest.approx(0.75)
  assert shares["share"]["conv forward"] == 0.0
  assert [row[0] for row in shares["top"]] == ["b", "a", "c"]


def test_traced_times_name_the_program_instructions():
  compiled, args = _program()
  jax.block_until_ready(compiled(*args))
  times = op_profile.traced_op_times(
      lambda: jax.block_until_ready(compiled(*args)), repeats=2)
  categories = op_profile.op_categories(compiled.as_text(), 2)
  shares = op_profile.category_shares(categories, times)
  assert shares["total_s"] > 0
  # Every convolution and matmul ran, and each got some time.
  for kind in ("conv forward", "conv weight-grad", "matmul"):
    assert shares["seconds"][kind] > 0, kind
  np.testing.assert_allclose(sum(shares["share"].values()), 1.0)


def test_a_launched_instruction_counts_until_the_next_operation_starts():
  # µs: conv launched at 0 (1 µs event), the relu starts at 10 and runs 5;
  # the conv launched again at 20 is the last operation (keeps its own 2).
  events = [
      {"ph": "X", "name": "conv.1", "ts": 0, "dur": 1},
      {"ph": "X", "name": "python_event", "ts": 3, "dur": 1},
      {"ph": "X", "name": "relu.2", "ts": 10, "dur": 5},
      {"ph": "X", "name": "conv.1", "ts": 20, "dur": 2},
      {"ph": "i", "name": "relu.2", "ts": 30},
  ]
  times = op_profile.op_durations(events, launched={"conv.1"},
                                  ops={"conv.1", "relu.2"})
  assert times["conv.1"] == pytest.approx(12e-6)
  assert times["relu.2"] == pytest.approx(5e-6)
  assert times["python_event"] == pytest.approx(1e-6)
  # Without `launched`, each event's own duration.
  plain = op_profile.op_durations(events)
  assert plain["conv.1"] == pytest.approx(3e-6)


def test_launched_instructions_are_the_unfused_convolutions():
  compiled, _ = _program()
  hlo_text = compiled.as_text()
  launched = op_profile.launched_instructions(hlo_text)
  categories = op_profile.op_categories(hlo_text, batch_size=2)
  assert launched and launched <= set(categories)
  assert {categories[name] for name in launched} <= {
      "conv forward", "conv input-grad", "conv weight-grad"}
  for name in launched:
    assert re.search(rf"%{re.escape(name)} = \S+ convolution\(", hlo_text)
