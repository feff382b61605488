"""Tests of mesh construction, the rules and global batches (one device)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pix2seq_d_jax import config_lib, sharding
from pix2seq_d_jax.models import layers
from tests import late_transfer


def test_make_mesh_fills_minus_one_and_rejects_bad_sizes():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)], devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
  with pytest.raises(ValueError, match="at most one size -1"):
    sharding.make_mesh([("data", -1), ("fsdp", -1)], devices)
  with pytest.raises(ValueError, match="multiply to 2"):
    sharding.make_mesh([("data", 2)], devices)


def test_batch_axes_come_from_the_batch_rule():
  devices = jax.devices()[:1]
  both = sharding.make_mesh([("data", 1), ("fsdp", 1)], devices)
  data = sharding.make_mesh([("data", 1)], devices)
  tp = sharding.make_mesh([("data", 1), ("model", 1)], devices)
  rule = [("batch", ("data", "fsdp"))]
  assert sharding.batch_axes(both, rule) == ("data", "fsdp")
  # Mesh axes the mesh lacks are dropped: one table, several meshes.
  assert sharding.batch_axes(data, rule) == ("data",)
  assert sharding.batch_sharding(data, rule).spec == jax.P("data")
  assert sharding.batch_axes(both, [("batch", "fsdp")]) == ("fsdp",)
  # Higher-precedence rules win; None replicates the batch.
  assert sharding.batch_axes(tp, [("batch", "data"), ("batch", "model")]) == (
      "data",)
  assert sharding.batch_axes(tp, [("batch", None)]) == ()
  assert sharding.batch_sharding(tp, [("batch", None)]).spec == jax.P()
  assert sharding.mesh_rules(
      [("batch", ("data", "fsdp")), ("mlp", "model"), ("norm", None)], tp
  ) == (("batch", "data"), ("mlp", "model"), ("norm", None))


def test_rules_errors_name_the_config_field():
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.sharding_rules=.*no rule for 'batch'"):
    sharding.batch_sharding(mesh, [("embed", "data")])
  with pytest.raises(config_lib.ConfigError,
                     match=r"rule for 'embed' names mesh axes \('fsdp',\)"):
    sharding.data_parallel_size(mesh, [("batch", "data"), ("embed", "fsdp")])
  with pytest.raises(config_lib.ConfigError, match="not a .* pair"):
    sharding.mesh_rules([("batch",)], mesh)


def test_global_batch_keeps_values_and_names_bad_field():
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  rules = [("batch", "data")]
  local = {"image": np.arange(12, dtype=np.float32).reshape(3, 2, 2)}
  out = sharding.global_batch(local, mesh, rules)
  np.testing.assert_array_equal(np.asarray(out["image"]), local["image"])
  assert out["image"].sharding.spec == jax.P("data")
  with pytest.raises(ValueError, match="'image_id'"):
    sharding.global_batch({"image_id": np.int32(3)}, mesh, rules)


def test_global_batch_on_cpu_is_ready_when_returned(monkeypatch):
  # A one-CPU computation runs on the calling thread only if its inputs are
  # ready, so the batch's copy is waited for on CPU. Made late on purpose:
  # the transfer returns the value of a computation still running.
  made = late_transfer.make_transfers_late(monkeypatch)
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  local = {"image": np.ones((2, 8), np.float32),
           "label": np.arange(2, dtype=np.int32)}
  out = sharding.global_batch(local, mesh, [("batch", "data")])
  assert len(made) == 2 and all(x.is_ready() for x in out.values())
  np.testing.assert_array_equal(np.asarray(out["label"]), [0, 1])


def test_activation_constraint_only_under_the_rules():
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  rules = [("batch", "data"), ("embed", "data")]

  def fn(x):
    return layers.constrain(x * 2.0, layers.TOKENS)

  x = jnp.ones((2, 3, 4))
  plain = jax.jit(fn).lower(x).as_text()
  ruled = jax.jit(sharding.with_activation_rules(fn, mesh, rules)).lower(
      x).as_text()
  assert "sharding_constraint" not in plain
  # `batch` takes `data` first, so `embed` (same mesh axis) is unsharded.
  assert 'sharding_constraint' in ruled and '[{"data"}, {}, {}]' in ruled
  # Rules are entered at trace time, not left behind.
  assert not nn.get_logical_axis_rules()
