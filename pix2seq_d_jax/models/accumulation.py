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
- 16-bit float operands of a dense layer's product (the last axis of the
  input against the first of a 2-D kernel): the product accumulated in
  float32 and rounded to the operands' dtype, with its own gradient: the
  input's
  gradient is again a bfloat16 product into float32, while the kernel's
  gradient (a contraction over all rows, which XLA:CPU computes faster in
  float32 than in bfloat16 at these shapes: [32768, 256]ᵀ·[32768, 256] in
  46 ms against 71 ms) is, on CPU, a float32 product of the upcast
  operands, rounded to the kernel's compute dtype as plain autodiff
  would. On accelerators the kernel's gradient is a 16-bit product into
  float32 like the others (`kernel_gradient_in_float32`);
- float32 operands under a bfloat16 matmul precision (the `precision`
  argument or `jax.default_matmul_precision`, 'bfloat16' or
  'BF16_BF16_F32'; the model's `matmul_precision`): on CPU, the operands
  rounded to bfloat16, the same native product into float32, and a float32
  result, with the same gradient rule. XLA:CPU accepts that precision but
  computes a float32 product (measured: the same values, the same time);
  TPU and GPU honour it themselves, so elsewhere the call goes to
  `lax.dot_general` with the precision unchanged;
- any other contraction (batch dimensions, other axes): `lax.dot_general`
  unchanged (see `dot_general` for why).
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
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dense = (tuple(lhs_contract) == (lhs.ndim - 1,)
           and tuple(rhs_contract) == (0,) and not lhs_batch
           and not rhs_batch and rhs.ndim == 2)
  operand_dtype = None
  if dense and preferred_element_type is None and not kwargs:
    operand_dtype = product_operand_dtype(lhs, rhs, precision)
  if operand_dtype is None:
    # Other contractions stay XLA's: on CPU, a 16-bit product into float32
    # whose operands XLA lays out transposed (e.g. a contraction over a
    # batched operand's second-minor axis) is not handed to YNNPACK, and
    # XLA:CPU's own dot kernel refuses it at run time ("Unsupported element
    # type for DotThunk::Execute: BF16 x BF16 = F32", jax 0.10). XLA
    # computes a 16-bit product in float32 and rounds it once: the values
    # an accumulated product has.
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  if lhs.dtype == jnp.float32:
    # The bfloat16 operands' product needs no precision of its own.
    precision = None
  return _dense_product(lhs, rhs, operand_dtype, precision)


_BFLOAT16_PRECISIONS = ('bfloat16', 'BF16_BF16_F32')


def product_operand_dtype(lhs: jax.Array, rhs: jax.Array,
                          precision: Any = None) -> jnp.dtype | None:
  """The dtype this module multiplies `lhs` and `rhs` in, or None for a
  plain `lax.dot_general`.

  16-bit float operands of one dtype: that dtype. float32 operands on CPU
  under a bfloat16 precision (`precision`, or None for
  `jax.default_matmul_precision`): bfloat16. Anything else: None.
  """
  if lhs.dtype != rhs.dtype:
    return None
  if _is_low_precision(lhs):
    return lhs.dtype
  if (lhs.dtype == jnp.float32 and jax.default_backend() == "cpu"
      and requests_bfloat16_products(precision)):
    return jnp.dtype(jnp.bfloat16)
  return None


def requests_bfloat16_products(precision: Any = None) -> bool:
  """Whether `precision` (None: `jax.default_matmul_precision`) asks that
  float32 products take bfloat16 operands and accumulate in float32."""
  if precision is None:
    precision = jax.config.jax_default_matmul_precision
  if isinstance(precision, lax.DotAlgorithmPreset):
    return precision == lax.DotAlgorithmPreset.BF16_BF16_F32
  return isinstance(precision, str) and precision in _BFLOAT16_PRECISIONS


def _accumulated(lhs, rhs, dimension_numbers, operand_dtype, precision):
  """The product of the operands in `operand_dtype`, accumulated in
  float32, in lhs's dtype."""
  return lax.dot_general(
      lhs.astype(operand_dtype), rhs.astype(operand_dtype),
      dimension_numbers, precision=precision,
      preferred_element_type=jnp.float32).astype(lhs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_product(x: jax.Array, kernel: jax.Array, operand_dtype: Any,
                   precision: Any) -> jax.Array:
  """x [..., d] · kernel [d, f] with operands in `operand_dtype`,
  accumulated in float32, in x's dtype."""
  return _accumulated(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                      operand_dtype, precision)


def _dense_product_fwd(x, kernel, operand_dtype, precision):
  return _dense_product(x, kernel, operand_dtype, precision), (x, kernel)


def _dense_product_bwd(operand_dtype, precision, residuals, dy):
  x, kernel = residuals
  dx = _accumulated(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())),
                    operand_dtype, precision)
  rows_x = x.reshape(-1, x.shape[-1])
  rows_dy = dy.reshape(-1, dy.shape[-1])
  rows_dtype = (jnp.float32 if kernel_gradient_in_float32()
                else operand_dtype)
  dkernel = lax.dot_general(
      rows_x.astype(rows_dtype), rows_dy.astype(rows_dtype),
      (((0,), (0,)), ((), ())), precision=precision,
      preferred_element_type=jnp.float32)
  return dx, dkernel.astype(kernel.dtype)


def kernel_gradient_in_float32() -> bool:
  """Whether a dense kernel's gradient upcasts its operands to float32.

  On CPU (the default backend at trace time) the row contraction runs
  faster in float32; accelerators multiply the 16-bit operands natively.
  """
  return jax.default_backend() == "cpu"


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)
