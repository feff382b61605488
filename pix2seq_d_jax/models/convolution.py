"""2-D convolutions whose backward pass runs at XLA:CPU's full speed.

`nn.Conv` calls `lax.conv_general_dilated`; its gradient with respect to the
kernel is one big "weight-gradient" convolution over the whole batch. On
XLA:CPU that convolution is slow exactly where this model spends its time
(measured on a 2-core x86 machine, float32, batch 2):

- a 3×3 weight gradient on 128×128 maps runs at 60–80 GFLOP/s, against
  150–200 GFLOP/s for the same arithmetic on maps of about 2,048 pixels;
- a 1×1 weight gradient runs at 18–85 GFLOP/s, while the same product
  written as a matrix multiplication runs 1.4–7.8× faster (100–160 GFLOP/s
  on the paper model's maps);
- over a batch of 2 its rate is also low on 32×32 maps with many channels
  and on strided windows (a 3×3 512→512 gradient at 32×32: 185 ms against
  58 ms one example at a time), and with YNNPACK's convolutions it runs
  at about half the rate with 256 or more output channels as with 128.

The `tiled` implementation computes the same convolution with those shapes:

- a 1×1 convolution (any stride, no padding) is a matrix multiplication over
  the pixels (strided: of every `stride`-th pixel), so all three of its
  products (forward, input gradient, weight gradient) are dots;
- a k×k convolution ('SAME', 'VALID' or explicit padding) whose output
  has at least `MIN_TILE_PIXELS` pixels per example keeps XLA's forward
  and input gradient and computes the weight gradient as a sum over row
  tiles of one example each (about `TILE_PIXELS` output pixels, read with
  their halo rows), accumulated in float32;
- everything else (dilations, groups, small maps) is
  `lax.conv_general_dilated` unchanged.

How the tiles are cut depends on the library that runs XLA:CPU's
convolutions in this process (`xla_env.cpu_convolution_library`, set by
`config.cpu_convolutions`). With YNNPACK's (XLA's default) each tile runs
in slices of at most `OUT_CHANNEL_CHUNK` output channels, and strided
convolutions are tiled too. With Eigen's (the entry points' default) a
tile keeps all its output channels, and strided convolutions keep XLA's
weight gradient: Eigen's kernel gradient runs as fast on 256 or 512
channels as on 128 (3×3 on 128×128 maps, 256→256 channels: 177–188 ms
whole, 191–207 ms in 128-channel slices), and over the batch it beats the
tiles on strided windows (the 3×3 stride-2 128→128 gradient on 128×128
maps 28 against 51 ms, the 7×7 stride-2 stem 10.5 against 20.6 ms;
2-core Intel Xeon, float32, batch 2, minimum of 5).

The results equal `lax`'s up to float summation order. Splitting the batch
into single examples would make a batch-sharded array move between devices,
so `resolve` picks `tiled` only on a single CPU device; `lax` everywhere
else (XLA's TPU and GPU convolutions do not have this problem).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pix2seq_d_jax import xla_env
from pix2seq_d_jax.models import accumulation

IMPLEMENTATIONS = ('auto', 'lax', 'tiled')
# Output pixels per weight-gradient tile: the map size at which XLA:CPU's
# weight-gradient convolution runs near its peak.
TILE_PIXELS = 2048
# Smaller outputs (per example) keep XLA's weight gradient: on 16×16 maps
# it is as fast as one example at a time, or faster.
MIN_TILE_PIXELS = 1024
# Output channels per tile convolution when YNNPACK runs the convolutions:
# with 256 or more, its kernel-gradient convolution runs at half the FLOP
# rate it reaches with 128 (a 3×3 256→256 gradient on 128×128 maps, batch
# 2: 538 ms in whole tiles, 287 ms in two 128-channel halves). Eigen's
# does not slow down, so with Eigen a tile keeps all its channels.
OUT_CHANNEL_CHUNK = 128
# Above this many tile convolutions per layer (examples × row tiles ×
# channel slices) the unrolled sum would inflate the program; such shapes
# keep XLA's weight gradient.
MAX_TILES = 64

_NHWC = ('NHWC', 'HWIO', 'NHWC')

ConvFn = Callable[..., jax.Array]


def resolve(implementation: str, *, platform: str, num_devices: int) -> str:
  """The concrete implementation ('lax' or 'tiled') of a config value.

  Args:
    implementation: one of `IMPLEMENTATIONS`; 'auto' is 'tiled' on a
      single CPU device and 'lax' otherwise.
    platform: the backend's platform ('cpu', 'gpu', 'tpu').
    num_devices: devices the step runs on.

  Returns:
    'lax' or 'tiled'.

  Raises:
    ValueError: an unknown implementation.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model.conv_impl={implementation!r}; expected one of '
                     f'{IMPLEMENTATIONS}.')
  if implementation != 'auto':
    return implementation
  return 'tiled' if platform == 'cpu' and num_devices == 1 else 'lax'


def conv_function(implementation: str) -> ConvFn:
  """The `conv_general_dilated` that `nn.Conv` should call.

  Args:
    implementation: 'lax' or 'tiled' (see `resolve`).

  Returns:
    A function with `lax.conv_general_dilated`'s signature.
  """
  if implementation == 'lax':
    return lax.conv_general_dilated
  if implementation == 'tiled':
    return tiled_conv
  raise ValueError(f'conv implementation {implementation!r}: expected '
                   "'lax' or 'tiled' (resolve 'auto' first).")


def _is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == expected
  return lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, tuple(dimension_numbers)) == expected


def _explicit_padding(padding: str | Sequence[tuple[int, int]],
                      spatial: Sequence[int], kernel: tuple[int, int],
                      strides: tuple[int, int]
                      ) -> tuple[tuple[int, int], ...] | None:
  """((top, bottom), (left, right)) of a 2-D convolution; None if unknown
  or negative (a cropping window, left to `lax`)."""
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID', 'SAME_LOWER'):
      return None
    return tuple(tuple(p) for p in lax.padtype_to_pads(
        spatial, kernel, strides, padding.upper()))
  pairs = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pairs) != 2 or any(len(p) != 2 or min(p) < 0 for p in pairs):
    return None
  return pairs


def tiled_conv(lhs: jax.Array,
               rhs: jax.Array,
               window_strides: Sequence[int],
               padding: str | Sequence[tuple[int, int]],
               lhs_dilation: Sequence[int] | None = None,
               rhs_dilation: Sequence[int] | None = None,
               dimension_numbers: Any = None,
               feature_group_count: int = 1,
               batch_group_count: int = 1,
               precision: Any = None,
               preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated` with XLA:CPU-friendly backward shapes.

  Same arguments and result as `lax.conv_general_dilated` (up to float
  summation order); see the module docstring for which convolutions take
  another route.
  """
  def fallback():
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)

  plain = (
      _is_nhwc(lhs, rhs, dimension_numbers)
      and feature_group_count == 1 and batch_group_count == 1
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and preferred_element_type is None)
  if not plain:
    return fallback()
  kernel = tuple(rhs.shape[:2])
  strides = tuple(window_strides)
  pads = _explicit_padding(padding, lhs.shape[1:3], kernel, strides)
  if kernel == (1, 1) and pads == ((0, 0), (0, 0)):
    return _pointwise(lhs, rhs, strides, precision)
  if pads is None:
    return fallback()
  eigen = xla_env.cpu_convolution_library() == 'eigen'
  if eigen and strides != (1, 1):
    return fallback()
  chunk = None if eigen else OUT_CHANNEL_CHUNK
  b, h, w, _ = lhs.shape
  out_h, out_w = (
      (size + lo + hi - k) // s + 1
      for size, (lo, hi), k, s in zip((h, w), pads, kernel, strides,
                                      strict=True))
  if out_h < 1 or out_w < 1 or out_h * out_w < MIN_TILE_PIXELS:
    return fallback()
  if b * -(-out_h // _tile_rows(out_w)) * _channel_slices(
      rhs.shape[3], chunk) > MAX_TILES:
    return fallback()
  return _tiled_conv(lhs, rhs, strides, pads, precision, chunk)


def _tile_rows(width: int) -> int:
  return max(1, TILE_PIXELS // width)


def _channel_slices(channels: int, chunk: int | None) -> int:
  return 1 if chunk is None else -(-channels // chunk)


def _pointwise(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
               precision: Any) -> jax.Array:
  """A 1×1 convolution as a matrix multiplication over (strided) pixels."""
  if strides != (1, 1):
    x = x[:, ::strides[0], ::strides[1], :]
  b, h, w, c = x.shape
  y = accumulation.dot_general(
      x.reshape(b * h * w, c), kernel.reshape(c, -1),
      (((1,), (0,)), ((), ())), precision=precision)
  return y.reshape(b, h, w, -1)


def _plain_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                pads: tuple[tuple[int, int], ...], precision: Any
                ) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, strides, pads, dimension_numbers=_NHWC,
      precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _tiled_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                pads: tuple[tuple[int, int], ...], precision: Any,
                out_channel_chunk: int | None) -> jax.Array:
  return _plain_conv(x, kernel, strides, pads, precision)


def _tiled_conv_fwd(x, kernel, strides, pads, precision, out_channel_chunk):
  return _plain_conv(x, kernel, strides, pads, precision), (x, kernel)


def _tiled_conv_bwd(strides, pads, precision, out_channel_chunk, residuals,
                    dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(
      lambda x_: _plain_conv(x_, kernel, strides, pads, precision), x)
  (dx,) = input_vjp(dy)
  return dx, tiled_weight_gradient(
      x, dy, kernel.shape[:2], strides=strides, padding=pads,
      precision=precision,
      out_channel_chunk=out_channel_chunk).astype(kernel.dtype)


_tiled_conv.defvjp(_tiled_conv_fwd, _tiled_conv_bwd)


def tiled_weight_gradient(
    x: jax.Array, dy: jax.Array, kernel: tuple[int, int], *,
    strides: tuple[int, int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = 'SAME',
    precision: Any = None,
    out_channel_chunk: int | None = None) -> jax.Array:
  """Gradient of a convolution's kernel, tile by tile.

  Args:
    x: [b, h, w, c_in] convolution input.
    dy: [b, out_h, out_w, c_out] gradient of the convolution output.
    kernel: (kh, kw).
    strides: the convolution's window strides.
    padding: its padding ('SAME', 'VALID' or explicit non-negative pairs).
    precision: passed to the tile convolutions.
    out_channel_chunk: output channels per tile convolution; None keeps
      all of them in one.

  Returns:
    float32 [kh, kw, c_in, c_out]: Σ over examples and row tiles of each
    tile's weight gradient (the tile's output rows with the input rows
    they read), each tile computed in slices of at most
    `out_channel_chunk` output channels.
  """
  kh, kw = kernel
  sh, sw = strides
  pads = _explicit_padding(padding, x.shape[1:3], kernel, strides)
  if pads is None:
    raise ValueError(f'tiled_weight_gradient: padding {padding!r} is not '
                     "'SAME', 'VALID' or non-negative (low, high) pairs")
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  b, out_h, out_w, c_out = dy.shape
  rows = _tile_rows(out_w)
  # Input columns the output reads (a strided window may leave some out).
  cols = (out_w - 1) * sw + kw
  chunk = out_channel_chunk or c_out
  total = None
  for n in range(b):
    for r in range(0, out_h, rows):
      r_end = min(out_h, r + rows)
      tile = padded[n:n + 1, r * sh:(r_end - 1) * sh + kh, :cols]
      # The kernel gradient of a VALID convolution of the tile is a
      # convolution whose "batch" is c_in and "features" are the pixels
      # (the output gradient dilated by the stride).
      part = jnp.concatenate([
          lax.conv_general_dilated(
              tile, dy[n:n + 1, r:r_end, :, c:c + chunk],
              (1, 1), 'VALID', rhs_dilation=strides,
              dimension_numbers=('CHWN', 'IHWO', 'NHWC'),
              precision=precision, preferred_element_type=jnp.float32)
          for c in range(0, c_out, chunk)], axis=-1)
      total = part if total is None else total + part
  # [c_in, kh, kw, c_out] -> [kh, kw, c_in, c_out]
  return jnp.transpose(total, (1, 2, 0, 3))
