"""The tiled convolution equals lax's, and takes the shapes it claims."""

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pix2seq_d_jax import config_lib
from pix2seq_d_jax.models import convolution, layers
from pix2seq_d_jax.models.pix2seq_d import Pix2SeqD

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _loss_and_grads(conv_fn, x, w, strides, padding):
  dn = lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)

  def loss(x, w):
    y = conv_fn(x, w, strides, padding, dimension_numbers=dn)
    # A non-linear read-out, so that dy differs per pixel and channel.
    return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1], dtype=y.dtype)), y

  (value, y), grads = jax.value_and_grad(loss, argnums=(0, 1),
                                         has_aux=True)(x, w)
  return value, y, grads


def _equations(fn, *args):
  """(primitive name, first output shape, input shapes) of every equation,
  nested ones included."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  found = []

  def walk(jp):
    for eqn in jp.eqns:
      found.append((eqn.primitive.name, tuple(eqn.outvars[0].aval.shape),
                    [tuple(getattr(v.aval, 'shape', ())) for v in eqn.invars]))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  return found


@pytest.mark.parametrize(
    'shape, kernel, strides, padding, tiled',
    [
        # 3x3 SAME on a map above TILE_PIXELS: tiled weight gradient, with
        # an uneven last row tile (2048 // 48 = 42 rows, then 6).
        ((2, 48, 48, 3), 3, 1, 'SAME', True),
        # 5x5 SAME (two halo rows each side).
        ((1, 64, 40, 2), 5, 1, 'SAME', True),
        # 1x1 as a matmul, with and without stride.
        ((2, 9, 11, 5), 1, 1, 'SAME', False),
        ((2, 9, 11, 5), 1, 2, ((0, 0), (0, 0)), False),
        ((2, 10, 12, 5), 1, 2, 'VALID', False),
        # Strided, explicit and VALID padding with outputs of at least
        # MIN_TILE_PIXELS: tiled too (32x32 outputs, one tile per example;
        # the ResNet stem's 7x7 stride-2 pads; uneven explicit pads).
        ((2, 64, 64, 3), 3, 2, 'SAME', True),
        ((1, 64, 64, 3), 7, 2, ((2, 3), (2, 3)), True),
        ((1, 40, 40, 2), 3, 1, 'VALID', True),
        ((1, 36, 36, 2), 3, 1, ((0, 2), (1, 0)), True),
        # Left to lax: outputs below MIN_TILE_PIXELS.
        ((2, 16, 16, 3), 3, 2, 'SAME', False),
        ((1, 32, 32, 3), 7, 2, ((2, 3), (2, 3)), False),
        ((2, 8, 8, 4), 3, 1, 'SAME', False),
    ])
def test_tiled_conv_equals_lax(shape, kernel, strides, padding, tiled):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (kernel, kernel, shape[-1], 6)) * 0.3
  ref = _loss_and_grads(lax.conv_general_dilated, x, w, (strides,) * 2,
                        padding)
  got = _loss_and_grads(convolution.tiled_conv, x, w, (strides,) * 2,
                        padding)
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  for g, r in zip(got[2], ref[2], strict=True):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
  # The route the module docstring promises: the tiled kernel gradient
  # (a custom VJP) exactly for the k x k shapes above the threshold.
  dn = lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)
  names = [name for name, _, _ in _equations(
      lambda x, w: convolution.tiled_conv(x, w, (strides,) * 2, padding,
                                          dimension_numbers=dn), x, w)]
  assert any(n.startswith('custom_vjp') for n in names) == tiled


def _weight_gradient_by_hand(x, dy, pads, stride):
  """Σ over pixels of the input each kernel tap reads times dy (float64)."""
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
  _, out_h, out_w, _ = dy.shape
  expected = np.zeros((3, 3, x.shape[-1], dy.shape[-1]), np.float64)
  for a in range(3):
    for b in range(3):
      expected[a, b] = np.einsum(
          'nhwc,nhwd->cd',
          padded[:, a:a + stride * out_h:stride, b:b + stride * out_w:stride],
          np.asarray(dy, np.float64))
  return expected


def test_weight_gradient_is_a_sum_over_example_row_tiles():
  x = jax.random.normal(jax.random.key(1), (2, 48, 48, 3))
  w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))

  def grads(x, w):
    return _loss_and_grads(convolution.tiled_conv, x, w, (1, 1), 'SAME')[2]

  # One [c_in, kh, kw, c_out] convolution per example and row tile
  # (2048 // 48 = 42 rows, then 6), none over the whole batch.
  tiles = [shape for name, shape, _ in _equations(grads, x, w)
           if name == 'conv_general_dilated' and shape == (3, 3, 3, 4)]
  assert len(tiles) == 2 * 2
  # The weight gradient by hand: sum over pixels of the shifted input times
  # the output gradient.
  dy = jax.random.normal(jax.random.key(3), (2, 48, 48, 4))
  expected = _weight_gradient_by_hand(x, dy, ((1, 1), (1, 1)), 1)
  got = convolution.tiled_weight_gradient(x, dy, (3, 3))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_strided_weight_gradient_in_output_channel_slices(monkeypatch):
  monkeypatch.setattr(convolution, 'OUT_CHANNEL_CHUNK', 4)
  x = jax.random.normal(jax.random.key(8), (2, 64, 64, 3))
  w = jax.random.normal(jax.random.key(9), (3, 3, 3, 6)) * 0.3

  def grads(x, w):
    return _loss_and_grads(convolution.tiled_conv, x, w, (2, 2), 'SAME')[2]

  # 32x32 outputs: one row tile per example, each in 4 + 2 output channels.
  tiles = sorted(shape for name, shape, _ in _equations(grads, x, w)
                 if name == 'conv_general_dilated' and shape[:3] == (3, 3, 3))
  assert tiles == [(3, 3, 3, 2)] * 2 + [(3, 3, 3, 4)] * 2
  # By hand: 'SAME' for a 3x3 stride-2 window on 64 pixels pads (0, 1), and
  # output pixel (i, j) reads input pixels (2i + a, 2j + b).
  dy = jax.random.normal(jax.random.key(10), (2, 32, 32, 6))
  expected = _weight_gradient_by_hand(x, dy, ((0, 1), (0, 1)), 2)
  got = convolution.tiled_weight_gradient(x, dy, (3, 3), strides=(2, 2))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(grads(x, w)[1], _loss_and_grads(
      lax.conv_general_dilated, x, w, (2, 2), 'SAME')[2][1],
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='padding'):
    convolution.tiled_weight_gradient(x, dy, (3, 3), padding=((-1, 0),) * 2)


EIGEN_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type='
               '-individual_convolution')


def test_with_eigen_convolutions_tiles_keep_their_channels(monkeypatch):
  """With Eigen running the convolutions, a tile's weight gradient is one
  convolution over all output channels, and strided windows keep XLA's."""
  monkeypatch.setenv('XLA_FLAGS', EIGEN_FLAGS)
  monkeypatch.setattr(convolution, 'OUT_CHANNEL_CHUNK', 4)
  x = jax.random.normal(jax.random.key(11), (2, 48, 48, 3))
  w = jax.random.normal(jax.random.key(12), (3, 3, 3, 6)) * 0.3

  def grads(x, w, strides):
    return _loss_and_grads(convolution.tiled_conv, x, w, strides, 'SAME')[2]

  # 2048 // 48 = 42 rows, then 6: two tiles per example, all 6 channels.
  eqns = _equations(functools.partial(grads, strides=(1, 1)), x, w)
  tiles = [shape for name, shape, _ in eqns
           if name == 'conv_general_dilated' and shape[:3] == (3, 3, 3)]
  assert tiles == [(3, 3, 3, 6)] * 4
  for got, ref in zip(grads(x, w, (1, 1)), _loss_and_grads(
      lax.conv_general_dilated, x, w, (1, 1), 'SAME')[2], strict=True):
    # Entries up to ~300: float32 summation order differs by ~1e-4.
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
  # Strided, with outputs above MIN_TILE_PIXELS (32x32): XLA's gradient,
  # i.e. no tiled custom VJP in the forward function.
  x = jax.random.normal(jax.random.key(13), (2, 64, 64, 3))
  dn = lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)

  def strided_vjps():
    return sum(name.startswith('custom_vjp') for name, _, _ in _equations(
        lambda x, w: convolution.tiled_conv(x, w, (2, 2), 'SAME',
                                            dimension_numbers=dn), x, w))
  assert strided_vjps() == 0
  # The same strided convolution is tiled when YNNPACK runs them.
  monkeypatch.setenv('XLA_FLAGS', '')
  assert strided_vjps() == 1


def test_pointwise_conv_has_no_convolution():
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((1, 1, 4, 5))
  dn = lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)

  def grads(x, w):
    return jax.grad(lambda x, w: convolution.tiled_conv(
        x, w, (1, 1), 'SAME', dimension_numbers=dn).sum(),
                    argnums=(0, 1))(x, w)
  names = [name for name, _, _ in _equations(grads, x, w)]
  assert 'conv_general_dilated' not in names
  assert 'dot_general' in names


def test_tiling_keeps_bfloat16_and_accumulates_in_float32():
  x = jax.random.normal(jax.random.key(4), (1, 64, 64, 4)).astype(
      jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(5), (3, 3, 4, 4)) * 0.3).astype(
      jnp.bfloat16)
  _, y, (dx, dw) = _loss_and_grads(convolution.tiled_conv, x, w, (1, 1),
                                   'SAME')
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  _, _, (_, dw32) = _loss_and_grads(
      lax.conv_general_dilated, x.astype(jnp.float32),
      w.astype(jnp.float32), (1, 1), 'SAME')
  np.testing.assert_allclose(np.asarray(dw, np.float32), dw32, rtol=0.05,
                             atol=0.05 * float(jnp.abs(dw32).max()))


def test_resolve():
  assert convolution.resolve('auto', platform='cpu', num_devices=1) == 'tiled'
  assert convolution.resolve('auto', platform='cpu', num_devices=8) == 'lax'
  assert convolution.resolve('auto', platform='gpu', num_devices=1) == 'lax'
  assert convolution.resolve('lax', platform='cpu', num_devices=1) == 'lax'
  assert convolution.resolve('tiled', platform='tpu', num_devices=4) == 'tiled'
  with pytest.raises(ValueError, match='model.conv_impl'):
    convolution.resolve('fast', platform='cpu', num_devices=1)
  assert convolution.conv_function('lax') is lax.conv_general_dilated
  assert convolution.conv_function('tiled') is convolution.tiled_conv


def test_config_rejects_unknown_conv_impl():
  config = importlib.import_module('configs.synthetic').get_config()
  config.model.conv_impl = 'fast'
  with pytest.raises(config_lib.ConfigError, match='model.conv_impl'):
    config_lib.validate(config)


def test_conv_factory_uses_the_implementation():
  x = jax.random.normal(jax.random.key(6), (2, 48, 48, 3))
  out = {}
  for impl in ('lax', 'tiled'):
    module = layers.conv(4, 3, conv_impl=impl)
    params = nn.unbox(module.init(jax.random.key(7), x))

    def loss(v, module=module):
      return jnp.sum(jnp.sin(module.apply(v, x)))
    out[impl] = jax.grad(loss)(params)['params']['kernel']
  np.testing.assert_allclose(out['tiled'], out['lax'], rtol=1e-4, atol=1e-4)
  assert isinstance(layers.conv(4, 3, conv_impl='tiled'), nn.Conv)


def test_model_routes_every_convolution(monkeypatch):
  """Pix2Seq-D passes conv_impl to every conv: same parameters, and with
  'tiled' no 1x1 convolution is left and the large maps' 3x3 convolutions
  carry the tiled gradient (16x16 maps, 64-pixel tiles here)."""
  monkeypatch.setattr(convolution, 'TILE_PIXELS', 64)
  monkeypatch.setattr(convolution, 'MIN_TILE_PIXELS', 32)
  kwargs = dict(mask_size=(16, 16), num_bits=4, num_outputs=8,
                backbone_depths=(1,), backbone_width=4, enc_layers=1,
                enc_dim=16, enc_mlp_dim=16, enc_heads=2, fuse_dim=8,
                dec_dim=8, dec_dim_mults=(1, 2), dec_transformer_layers=1,
                dec_transformer_dim=16, dec_heads=2)
  inputs = (jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
            jax.ShapeDtypeStruct((2, 16, 16, 4), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.float32))
  found = {}
  for impl in ('lax', 'tiled'):
    model = Pix2SeqD(conv_impl=impl, **kwargs)
    shapes = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), *inputs)

    def forward(variables, image, x_t, gamma, model=model):
      return model.apply(variables, image, x_t, gamma, train=False)
    eqns = _equations(forward, shapes, *inputs)
    found[impl] = (
        jax.tree.map(lambda a: (a.shape, a.dtype), shapes),
        sum(name == 'conv_general_dilated' and ins[1][:2] == (1, 1)
            for name, _, ins in eqns),
        # Tiled convolutions: a custom VJP whose second input is a 4-D
        # kernel (GroupNorm's custom VJP takes 1-D scale and bias).
        sum(name.startswith('custom_vjp') and len(ins) > 1
            and len(ins[1]) == 4 for name, _, ins in eqns))
  assert found['tiled'][0] == found['lax'][0]
  # 1x1 convolutions became matmuls; large-map 3x3 ones have the tiled VJP.
  assert found['lax'][1] > 0 and found['tiled'][1] == 0
  assert found['lax'][2] == 0 and found['tiled'][2] > 0
