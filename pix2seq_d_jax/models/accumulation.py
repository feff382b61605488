"""Low-precision matrix products that accumulate in float32.

With `model.dtype='bfloat16'`, flax's `nn.Dense` multiplies bfloat16 inputs
by a bfloat16 kernel into a bfloat16 result. XLA:CPU has no bfloat16 kernel
for that product: it converts both inputs to float32, multiplies in float32
and rounds the result, so the bfloat16 model ran its dense layers at the
float32 rate plus the conversions. A product of bfloat16 inputs *into
float32* (`preferred_element_type=float32`) is a native kernel (on x86 CPUs
with AMX or AVX512-BF16; measured on an Intel Xeon with AMX, 2048³:
998 GFLOP/s against 209 in float32), and it is what mixed precision asks
for anyway: bfloat16 operands, float32 accumulation, the result rounded
once.

`dot_general` is a drop-in `lax.dot_general` for `nn.Dense(dot_general=...)`
and the 1×1 convolutions of `convolution.tiled_conv`:

- float32 (or any non-16-bit) operands: `lax.dot_general` unchanged, so
  float32 models compute exactly what they computed before;
- 16-bit float operands: the product accumulated in float32 and rounded to
  the operands' dtype. A dense layer's product (the last axis of the input
  against the first of a 2-D kernel) has its own gradient: the input's
  gradient is again a bfloat16 product into float32, while the kernel's
  gradient (a contraction over all rows, which XLA:CPU computes faster in
  float32 than in bfloat16 at these shapes: [32768, 256]ᵀ·[32768, 256] in
  46 ms against 71 ms) is, on CPU, a float32 product of the upcast
  operands, rounded to the kernel's compute dtype as plain autodiff
  would. On accelerators the kernel's gradient is a 16-bit product into
  float32 like the others (`kernel_gradient_in_float32`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _is_low_precision(x: jax.Array) -> bool:
  return any(x.dtype == d for d in _LOW_PRECISION)


def dot_general(lhs: jax.Array,
                rhs: jax.Array,
                dimension_numbers: Any,
                precision: Any = None,
                preferred_element_type: Any = None,
                **kwargs: Any) -> jax.Array:
  """`lax.dot_general`, accumulated in float32 for 16-bit float operands.

  Returns the result in the operands' dtype (or `preferred_element_type`
  when given), as `lax.dot_general` does.
  """
  if (preferred_element_type is not None or kwargs
      or not (_is_low_precision(lhs) and lhs.dtype == rhs.dtype)):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and not lhs_batch and not rhs_batch and rhs.ndim == 2):
    return _dense_product(lhs, rhs, precision)
  return _accumulated(lhs, rhs, dimension_numbers, precision)


def _accumulated(lhs, rhs, dimension_numbers, precision):
  """The product accumulated in float32, rounded to lhs's dtype."""
  return lax.dot_general(
      lhs, rhs, dimension_numbers, precision=precision,
      preferred_element_type=jnp.float32).astype(lhs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_product(x: jax.Array, kernel: jax.Array, precision: Any
                   ) -> jax.Array:
  """x [..., d] · kernel [d, f], accumulated in float32, in x's dtype."""
  return _accumulated(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                      precision)


def _dense_product_fwd(x, kernel, precision):
  return _dense_product(x, kernel, precision), (x, kernel)


def _dense_product_bwd(precision, residuals, dy):
  x, kernel = residuals
  dx = _accumulated(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())),
                    precision)
  rows_x = x.reshape(-1, x.shape[-1])
  rows_dy = dy.reshape(-1, dy.shape[-1])
  if kernel_gradient_in_float32():
    rows_x, rows_dy = rows_x.astype(jnp.float32), rows_dy.astype(jnp.float32)
  dkernel = lax.dot_general(
      rows_x, rows_dy, (((0,), (0,)), ((), ())), precision=precision,
      preferred_element_type=jnp.float32)
  return dx, dkernel.astype(kernel.dtype)


def kernel_gradient_in_float32() -> bool:
  """Whether a dense kernel's gradient upcasts its operands to float32.

  On CPU (the default backend at trace time) the row contraction runs
  faster in float32; accelerators multiply the 16-bit operands natively.
  """
  return jax.default_backend() == "cpu"


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)
