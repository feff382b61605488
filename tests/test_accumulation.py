"""bfloat16 products accumulated in float32 (`models/accumulation.py`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pix2seq_d_jax.models import accumulation, convolution, layers
from tests import hlo

DENSE = (((2,), (0,)), ((), ()))


def _operands(dtype=jnp.bfloat16):
  x = jax.random.normal(jax.random.key(0), (2, 24, 48)).astype(dtype)
  k = (0.2 * jax.random.normal(jax.random.key(1), (48, 40))).astype(dtype)
  return x, k


def _float64_product(x, k):
  return np.einsum("btd,df->btf", np.asarray(x, np.float64),
                   np.asarray(k, np.float64))


def test_float32_operands_are_plain_dot_general():
  x, k = _operands(jnp.float32)
  out = accumulation.dot_general(x, k, DENSE)
  np.testing.assert_array_equal(out, lax.dot_general(x, k, DENSE))
  # A float32 dense layer computes what flax's default layer computes.
  dense = layers.dense(40, ("embed", "mlp"))
  params = dense.init(jax.random.key(2), x)
  np.testing.assert_array_equal(
      dense.apply(params, x),
      nn.Dense(40).apply({"params": nn.unbox(params["params"])}, x))


def test_bfloat16_product_is_the_rounded_exact_sum():
  x, k = _operands()
  out = accumulation.dot_general(x, k, DENSE)
  assert out.dtype == jnp.bfloat16
  exact = _float64_product(x, k)
  # Products of bfloat16 values are exact in float32; summed in float32
  # and rounded once, the result is within one bfloat16 rounding (2^-8
  # relative) of the exact sum.
  np.testing.assert_allclose(np.asarray(out, np.float64), exact,
                             rtol=2.0**-8, atol=1e-6)
  # A general contraction (batch dimensions) is XLA's own, which computes
  # a bfloat16 product in float32 and rounds it once: the same bound.
  q = x.reshape(2, 24, 4, 12)
  logits = accumulation.dot_general(
      q, q, (((3,), (3,)), ((0, 2), (0, 2))))
  assert logits.dtype == jnp.bfloat16 and logits.shape == (2, 4, 24, 24)
  exact_logits = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64),
                           np.asarray(q, np.float64))
  np.testing.assert_allclose(np.asarray(logits, np.float64), exact_logits,
                             rtol=2.0**-8, atol=1e-6)


@pytest.mark.parametrize("kernel_gradient_in_float32", [True, False])
def test_bfloat16_gradients_equal_autodiff_of_the_accumulated_product(
    monkeypatch, kernel_gradient_in_float32):
  monkeypatch.setattr(accumulation, "kernel_gradient_in_float32",
                      lambda: kernel_gradient_in_float32)
  x, k = _operands()
  g = jax.random.normal(jax.random.key(3), (2, 24, 40)).astype(jnp.bfloat16)

  def reference(x, k):
    return lax.dot_general(x, k, DENSE,
                           preferred_element_type=jnp.float32).astype(x.dtype)

  _, vjp = jax.vjp(lambda x, k: accumulation.dot_general(x, k, DENSE), x, k)
  _, ref_vjp = jax.vjp(reference, x, k)
  (dx, dk), (ref_dx, ref_dk) = vjp(g), ref_vjp(g)
  assert dx.dtype == dk.dtype == jnp.bfloat16
  # Against the exact (float64) gradients: within one bfloat16 rounding.
  g64, x64, k64 = (np.asarray(a, np.float64) for a in (g, x, k))
  np.testing.assert_allclose(np.asarray(dx, np.float64),
                             np.einsum("btf,df->btd", g64, k64),
                             rtol=2.0**-8, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dk, np.float64),
                             np.einsum("btd,btf->df", x64, g64),
                             rtol=2.0**-8, atol=1e-6)
  for ours, ref in ((dx, ref_dx), (dk, ref_dk)):
    np.testing.assert_allclose(np.asarray(ours, np.float32),
                               np.asarray(ref, np.float32),
                               rtol=2.0**-7, atol=1e-6)


def test_explicit_result_dtype_passes_through():
  x, k = _operands()
  out = accumulation.dot_general(x, k, DENSE,
                                 preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(
      out, lax.dot_general(x, k, DENSE, preferred_element_type=jnp.float32))


def test_bfloat16_dense_layer_keeps_bfloat16_operands_in_the_compiled_program():
  # The point of the module: XLA:CPU turns a bfloat16 -> bfloat16 product
  # into a float32 one (both operands converted), but keeps a bfloat16
  # product into float32 native, forward and in the input's gradient.
  x, _ = _operands()
  plain = nn.Dense(40, dtype=jnp.bfloat16)
  ours = layers.dense(40, ("embed", "mlp"), dtype=jnp.bfloat16)
  params = ours.init(jax.random.key(2), x)

  def program(module, variables):
    def loss(v, x):
      return jnp.sum(module.apply(v, x).astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        variables, x).compile().as_text()

  plain_dots = hlo.dot_operand_dtypes(
      program(plain, {"params": nn.unbox(params["params"])}))
  our_dots = hlo.dot_operand_dtypes(program(ours, params))
  assert plain_dots and all(d == ("f32", "f32") for d in plain_dots)
  assert our_dots.count(("bf16", "bf16")) == 2, our_dots


def test_pointwise_convolution_accumulates_in_float32():
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 48)).astype(jnp.bfloat16)
  k = (0.2 * jax.random.normal(jax.random.key(5), (1, 1, 48, 40))).astype(
      jnp.bfloat16)
  out = convolution.tiled_conv(x, k, (1, 1), "VALID",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert out.dtype == jnp.bfloat16
  exact = np.einsum("bhwc,co->bhwo", np.asarray(x, np.float64),
                    np.asarray(k[0, 0], np.float64))
  np.testing.assert_allclose(np.asarray(out, np.float64), exact,
                             rtol=2.0**-8, atol=1e-6)


BFLOAT16_PRECISIONS = ["bfloat16", "BF16_BF16_F32",
                       lax.DotAlgorithmPreset.BF16_BF16_F32]


def _float64_of_bfloat16(*arrays):
  return [np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
          for a in arrays]


@pytest.mark.parametrize("precision", BFLOAT16_PRECISIONS)
def test_bfloat16_precision_multiplies_float32_operands_as_bfloat16(
    precision):
  x, k = _operands(jnp.float32)
  out = accumulation.dot_general(x, k, DENSE, precision=precision)
  assert out.dtype == jnp.float32
  # The exact product of the operands rounded to bfloat16, summed in
  # float32 (not rounded to bfloat16 afterwards) ...
  rounded = _float64_product(*_float64_of_bfloat16(x, k))
  np.testing.assert_allclose(np.asarray(out, np.float64), rounded,
                             rtol=1e-5, atol=1e-5)
  # ... which is not the float32 product: the operands were rounded.
  exact = _float64_product(x, k)
  assert np.abs(np.asarray(out, np.float64) - exact).max() > 1e-3
  # `jax.default_matmul_precision` asks the same as the argument.
  if isinstance(precision, str):
    with jax.default_matmul_precision(precision):
      np.testing.assert_array_equal(
          jax.jit(lambda a, b: accumulation.dot_general(a, b, DENSE))(x, k),
          out)
  # A float32 precision keeps the float32 product.
  np.testing.assert_array_equal(
      accumulation.dot_general(x, k, DENSE, precision="highest"),
      lax.dot_general(x, k, DENSE))


@pytest.mark.parametrize("kernel_gradient_in_float32", [True, False])
def test_bfloat16_precision_gradients(monkeypatch, kernel_gradient_in_float32):
  monkeypatch.setattr(accumulation, "kernel_gradient_in_float32",
                      lambda: kernel_gradient_in_float32)
  x, k = _operands(jnp.float32)
  g = jax.random.normal(jax.random.key(3), (2, 24, 40))
  _, vjp = jax.vjp(lambda x, k: accumulation.dot_general(
      x, k, DENSE, precision="bfloat16"), x, k)
  dx, dk = vjp(g)
  assert dx.dtype == dk.dtype == jnp.float32
  g16, k16, x16 = _float64_of_bfloat16(g, k, x)
  np.testing.assert_allclose(np.asarray(dx, np.float64),
                             np.einsum("btf,df->btd", g16, k16),
                             rtol=1e-5, atol=1e-5)
  # On CPU the kernel's gradient is the float32 product of the unrounded
  # operands; elsewhere the bfloat16 one.
  x_k, g_k = ((np.asarray(x, np.float64), np.asarray(g, np.float64))
              if kernel_gradient_in_float32 else (x16, g16))
  np.testing.assert_allclose(np.asarray(dk, np.float64),
                             np.einsum("btd,btf->df", x_k, g_k),
                             rtol=1e-5, atol=1e-4)


def test_bfloat16_precision_compiles_to_bfloat16_operand_dots():
  # XLA:CPU keeps the float32 dot of a float32 layer under a bfloat16
  # precision (the precision is accepted and ignored); ours multiplies
  # bfloat16 operands, forward and in the input's gradient.
  x, _ = _operands(jnp.float32)
  dense = layers.dense(40, ("embed", "mlp"))
  params = dense.init(jax.random.key(2), x)

  def program(module, variables):
    def loss(v, x):
      return jnp.sum(module.apply(v, x) ** 2)
    with jax.default_matmul_precision("bfloat16"):
      return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
          variables, x).compile().as_text()

  plain_dots = hlo.dot_operand_dtypes(
      program(nn.Dense(40), {"params": nn.unbox(params["params"])}))
  our_dots = hlo.dot_operand_dtypes(program(dense, params))
  assert plain_dots and all(d == ("f32", "f32") for d in plain_dots)
  assert our_dots.count(("bf16", "bf16")) == 2, our_dots



@pytest.mark.parametrize("shape,features", [
    ((1, 7), 3), ((1, 1, 64), 16), ((2, 1, 16), 128), ((3, 5, 16), 1),
    ((4, 2, 3, 8), 32), ((8, 3), 64)])
@pytest.mark.parametrize("mode", ["bfloat16 operands", "bfloat16 precision"])
def test_dense_products_run_at_any_shape(shape, features, mode):
  # XLA:CPU's own dot kernel refuses bfloat16 operands into float32; such
  # a product runs only where XLA hands it to YNNPACK. The dense forms
  # (forward and both gradients) must run, with their values, whatever
  # the row count or rank.
  x = jax.random.normal(jax.random.key(9), shape)
  k = 0.3 * jax.random.normal(jax.random.key(10), (shape[-1], features))
  precision = "bfloat16" if mode == "bfloat16 precision" else None
  if precision is None:
    x, k = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  dense = (((x.ndim - 1,), (0,)), ((), ()))

  def loss(x, k):
    out = accumulation.dot_general(x, k, dense).astype(jnp.float32)
    return jnp.sum(out ** 2), out

  with jax.default_matmul_precision(precision):
    (_, out), (dx, dk) = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True))(x, k)
  x16, k16 = _float64_of_bfloat16(x, k)
  exact = np.einsum("...d,df->...f", x16, k16)
  np.testing.assert_allclose(np.asarray(out, np.float64), exact,
                             rtol=2.0**-7, atol=1e-3)
  # The gradients, within bfloat16 roundings of their largest entry (the
  # output gradient is itself a rounded value).
  g = 2.0 * exact
  for value, ref in (
      (dx, np.einsum("...f,df->...d", g, k16)),
      (dk, x16.reshape(-1, shape[-1]).T @ g.reshape(-1, features))):
    np.testing.assert_allclose(np.asarray(value, np.float64), ref,
                               rtol=0, atol=2e-2 * np.abs(ref).max())
