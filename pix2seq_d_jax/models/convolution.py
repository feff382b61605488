"""2-D convolutions whose backward pass runs at XLA:CPU's full speed.

`nn.Conv` calls `lax.conv_general_dilated`; its gradient with respect to the
kernel is one big "weight-gradient" convolution over the whole batch. On
XLA:CPU that convolution is slow exactly where this model spends its time
(measured on a 2-core x86 machine, float32, batch 2):

- a 3×3 weight gradient on 128×128 maps runs at 60–80 GFLOP/s, against
  150–200 GFLOP/s for the same arithmetic on maps of about 2,048 pixels;
- a 1×1 weight gradient runs at 18–85 GFLOP/s, while the same product
  written as a matrix multiplication runs 1.4–7.8× faster (100–160 GFLOP/s
  on the paper model's maps).

The `tiled` implementation computes the same convolution with those shapes:

- a 1×1 convolution (any stride, no padding) is a matrix multiplication over
  the pixels (strided: of every `stride`-th pixel), so all three of its
  products (forward, input gradient, weight gradient) are dots;
- a k×k stride-1 'SAME' convolution on maps larger than `TILE_PIXELS`
  keeps XLA's forward and input gradient and computes the weight gradient
  as a sum over row tiles of one example each (about `TILE_PIXELS` pixels,
  plus the k − 1 halo rows), accumulated in float32;
- everything else (strided k×k, dilations, groups, small maps) is
  `lax.conv_general_dilated` unchanged.

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

IMPLEMENTATIONS = ('auto', 'lax', 'tiled')
# Pixels per weight-gradient tile: the map size at which XLA:CPU's
# weight-gradient convolution runs near its peak.
TILE_PIXELS = 2048
# Above this many tiles per convolution (examples × row tiles) the unrolled
# sum would inflate the program; such shapes keep XLA's weight gradient.
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
                      kernel: tuple[int, int]) -> list[tuple[int, int]] | None:
  """Padding pairs for a stride-1 convolution, or None if not expressible."""
  if isinstance(padding, str):
    if padding.upper() == 'VALID':
      return [(0, 0), (0, 0)]
    if padding.upper() == 'SAME':
      return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel]
    return None
  pairs = [tuple(p) for p in padding]
  return pairs if len(pairs) == 2 else None


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
  pads = _explicit_padding(padding, kernel)
  if kernel == (1, 1) and pads == [(0, 0), (0, 0)]:
    return _pointwise(lhs, rhs, strides, precision)
  if strides != (1, 1) or pads is None:
    return fallback()
  b, h, w, _ = lhs.shape
  rows = _tile_rows(w)
  same = pads == [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel]
  if not same or h * w <= TILE_PIXELS or b * -(-h // rows) > MAX_TILES:
    return fallback()
  return _same_conv(lhs, rhs, precision)


def _tile_rows(width: int) -> int:
  return max(1, TILE_PIXELS // width)


def _pointwise(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
               precision: Any) -> jax.Array:
  """A 1×1 convolution as a matrix multiplication over (strided) pixels."""
  if strides != (1, 1):
    x = x[:, ::strides[0], ::strides[1], :]
  b, h, w, c = x.shape
  y = jnp.dot(x.reshape(b * h * w, c), kernel.reshape(c, -1),
              precision=precision)
  return y.reshape(b, h, w, -1)


def _plain_conv(x: jax.Array, kernel: jax.Array, padding: Any,
                precision: Any) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=_NHWC,
      precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _same_conv(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
  return _plain_conv(x, kernel, 'SAME', precision)


def _same_conv_fwd(x, kernel, precision):
  return _plain_conv(x, kernel, 'SAME', precision), (x, kernel)


def _same_conv_bwd(precision, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(
      lambda x_: _plain_conv(x_, kernel, 'SAME', precision), x)
  (dx,) = input_vjp(dy)
  return dx, tiled_weight_gradient(x, dy, kernel.shape[:2],
                                   precision).astype(kernel.dtype)


_same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def tiled_weight_gradient(x: jax.Array, dy: jax.Array,
                          kernel: tuple[int, int],
                          precision: Any = None) -> jax.Array:
  """Gradient of a stride-1 'SAME' convolution's kernel, tile by tile.

  Args:
    x: [b, h, w, c_in] convolution input.
    dy: [b, h, w, c_out] gradient of the convolution output.
    kernel: (kh, kw), both odd or even as 'SAME' padding allows.
    precision: passed to the tile convolutions.

  Returns:
    float32 [kh, kw, c_in, c_out]: Σ over examples and row tiles of each
    tile's weight gradient (the tile read with its kh − 1 halo rows).
  """
  kh, kw = kernel
  b, h, w, _ = x.shape
  (top, bottom), (left, right) = _explicit_padding('SAME', kernel)
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  rows = _tile_rows(w)
  total = None
  for n in range(b):
    for r in range(0, h, rows):
      r_end = min(h, r + rows)
      # The kernel gradient of a VALID convolution of the tile is a
      # convolution whose "batch" is c_in and "features" are the pixels.
      part = lax.conv_general_dilated(
          padded[n:n + 1, r:r_end + kh - 1], dy[n:n + 1, r:r_end],
          (1, 1), 'VALID', dimension_numbers=('CHWN', 'IHWO', 'NHWC'),
          precision=precision, preferred_element_type=jnp.float32)
      total = part if total is None else total + part
  # [c_in, kh, kw, c_out] -> [kh, kw, c_in, c_out]
  return jnp.transpose(total, (1, 2, 0, 3))
