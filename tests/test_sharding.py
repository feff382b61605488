"""Tests of mesh construction and global batch assembly (one CPU device)."""

import jax
import numpy as np
import pytest

from pix2seq_d_jax import sharding


def test_make_mesh_fills_minus_one_and_rejects_bad_sizes():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)], devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
  assert sharding.batch_axes(mesh) == ("data", "fsdp")
  with pytest.raises(ValueError, match="at most one size -1"):
    sharding.make_mesh([("data", -1), ("fsdp", -1)], devices)
  with pytest.raises(ValueError, match="multiply to 2"):
    sharding.make_mesh([("data", 2)], devices)


def test_global_batch_keeps_values_and_names_bad_field():
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  local = {"image": np.arange(12, dtype=np.float32).reshape(3, 2, 2)}
  out = sharding.global_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(out["image"]), local["image"])
  with pytest.raises(ValueError, match="'image_id'"):
    sharding.global_batch({"image_id": np.int32(3)}, mesh)
