"""GroupNorm with the hand-derived backward pass against flax's and numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pix2seq_d_jax.models import group_norm as group_norm_lib
from pix2seq_d_jax.models import layers


def _inputs(shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  channels = shape[-1]
  # A non-zero mean and a spread of scales, so E[x²] − E[x]² is exercised.
  x = 3.0 * jax.random.normal(keys[0], shape) + 1.5
  scale = 1.0 + 0.3 * jax.random.normal(keys[1], (channels,))
  bias = 0.2 * jax.random.normal(keys[2], (channels,))
  upstream = jax.random.normal(keys[3], shape)
  return x, scale, bias, upstream


def _numpy_group_norm(x, scale, bias, groups, epsilon=1e-5):
  x = np.asarray(x, np.float64)
  batch, channels = x.shape[0], x.shape[-1]
  grouped = x.reshape(batch, -1, groups, channels // groups)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  var = grouped.var(axis=(1, 3), keepdims=True)
  normed = ((grouped - mean) / np.sqrt(var + epsilon)).reshape(x.shape)
  return normed * np.asarray(scale) + np.asarray(bias)


@pytest.mark.parametrize('shape, groups', [
    ((2, 6, 5, 8), 4),     # an image map
    ((2, 7, 12), 3),       # one spatial axis
    ((3, 8), 2),           # no spatial axis: groups of channels only
    ((1, 4, 4, 6), 6),     # one channel per group
])
def test_values_and_gradients_equal_flax_group_norm(shape, groups):
  x, scale, bias, upstream = _inputs(shape)
  reference = nn.GroupNorm(num_groups=groups, epsilon=1e-5)
  params = {'params': {'scale': scale, 'bias': bias}}

  def flax_loss(x, scale, bias):
    y = reference.apply({'params': {'scale': scale, 'bias': bias}}, x)
    return jnp.sum(nn.silu(y) * upstream)

  def our_loss(x, scale, bias):
    y = group_norm_lib.group_norm(x, scale, bias, groups, 1e-5, jnp.float32)
    return jnp.sum(nn.silu(y) * upstream)

  ours = group_norm_lib.group_norm(x, scale, bias, groups, 1e-5, jnp.float32)
  np.testing.assert_allclose(ours, reference.apply(params, x),
                             rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(ours, _numpy_group_norm(x, scale, bias, groups),
                             rtol=1e-5, atol=2e-5)
  expected = jax.grad(flax_loss, argnums=(0, 1, 2))(x, scale, bias)
  got = jax.jit(jax.grad(our_loss, argnums=(0, 1, 2)))(x, scale, bias)
  for name, g, e in zip(('x', 'scale', 'bias'), got, expected,
                        strict=True):
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-5, err_msg=name)


def test_module_has_flax_parameters_and_logical_names():
  x = jnp.ones((2, 4, 4, 16))
  ours = layers.group_norm(16, zero_init=True, name='norm')
  variables = ours.init(jax.random.key(0), x)
  flax_variables = nn.GroupNorm(num_groups=layers.num_groups(16)).init(
      jax.random.key(0), x)
  unboxed = nn.meta.unbox(variables)
  assert jax.tree.map(jnp.shape, unboxed) == jax.tree.map(
      jnp.shape, flax_variables)
  assert jax.tree.structure(unboxed) == jax.tree.structure(flax_variables)
  np.testing.assert_array_equal(unboxed['params']['scale'], np.zeros(16))
  names = jax.tree.map(lambda p: p.names, variables['params'],
                       is_leaf=lambda p: isinstance(p, nn.Partitioned))
  assert names == {'scale': ('norm',), 'bias': ('norm',)}


def test_bfloat16_compute_keeps_float32_statistics():
  x, scale, bias, upstream = _inputs((2, 8, 8, 8), seed=1)
  x16 = x.astype(jnp.bfloat16)
  y = group_norm_lib.group_norm(x16, scale, bias, 4, 1e-5, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  # The statistics of the bfloat16 input, taken in float64: only the output
  # rounding to bfloat16 separates them.
  expected = _numpy_group_norm(np.asarray(x16, np.float32), scale, bias, 4)
  np.testing.assert_allclose(np.asarray(y, np.float32), expected,
                             rtol=1e-2, atol=2e-2)
  dx = jax.grad(lambda v: jnp.sum(group_norm_lib.group_norm(
      v, scale, bias, 4, 1e-5, jnp.bfloat16).astype(jnp.float32)
      * upstream))(x16)
  dx32 = jax.grad(lambda v: jnp.sum(group_norm_lib.group_norm(
      v, scale, bias, 4, 1e-5, jnp.float32) * upstream))(
          x16.astype(jnp.float32))
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx, np.float32), dx32,
                             rtol=2e-2, atol=2e-2)


def test_gradient_under_remat_equals_plain():
  x, scale, bias, upstream = _inputs((2, 6, 6, 8), seed=2)

  def loss(x, scale, bias):
    y = group_norm_lib.group_norm(x, scale, bias, 2, 1e-5, jnp.float32)
    return jnp.sum(nn.silu(y) * upstream)

  plain = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(
      x, scale, bias)
  for p, r in zip(plain, remat, strict=True):
    np.testing.assert_allclose(p, r, rtol=1e-6, atol=1e-6)


def test_channels_not_divisible_by_groups_is_an_error():
  module = group_norm_lib.GroupNorm(num_groups=4, name='norm_in')
  with pytest.raises(ValueError, match=r'norm_in.*num_groups=4.*\(2, 3, 6\)'):
    module.init(jax.random.key(0), jnp.ones((2, 3, 6)))
