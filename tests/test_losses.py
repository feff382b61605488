"""Tests of pix2seq_d_jax.diffusion.losses against independent numpy code."""

import jax
import numpy as np
import pytest

from pix2seq_d_jax.diffusion import losses

_B, _H, _W = 2, 3, 4


def _np_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _random_case(num_channels, num_bits=4, seed=0):
  rng = np.random.RandomState(seed)
  output = rng.randn(_B, _H, _W, num_channels).astype(np.float32) * 2
  bits = rng.randint(0, 2, size=(_B, _H, _W, num_bits)).astype(np.int32)
  eps = rng.randn(_B, _H, _W, num_bits).astype(np.float32)
  weights = rng.uniform(0.0, 2.0, size=(_B, _H, _W)).astype(np.float32)
  return output, bits, eps, weights


def _loss(output, bits, eps, weights, loss_type, scale=0.1, groups=2,
          **kwargs):
  return losses.diffusion_loss(
      output, x0_bits=bits, x_t=np.zeros_like(eps),
      gamma_t=np.full((len(eps),), 0.5, np.float32), eps=eps,
      weights=weights, loss_type=loss_type, scale=scale,
      softmax_groups=groups, **kwargs)


def test_num_output_channels():
  assert losses.num_output_channels('x_softmax_xent') == 512
  assert losses.num_output_channels('x_softmax_xent', 16, 4) == 64
  assert losses.num_output_channels('x_softmax_xent', 16, 1) == 65536
  for loss_type in ('x_sigmoid_xent', 'x', 'eps'):
    assert losses.num_output_channels(loss_type, 16) == 16
  with pytest.raises(ValueError, match='divide num_bits=16'):
    losses.num_output_channels('x_softmax_xent', 16, 3)
  with pytest.raises(ValueError, match='x_softmax_xent'):
    losses.num_output_channels('l1', 16)


def test_softmax_xent_matches_numpy():
  output, bits, eps, weights = _random_case(8, num_bits=4)  # 2 groups x 4.
  loss, per_example = _loss(output, bits, eps, weights, 'x_softmax_xent')
  log_p = _np_log_softmax(output.reshape(_B, _H, _W, 2, 4).astype(np.float64))
  # Group g holds bits [2g, 2g + 1], least-significant bit first.
  targets = np.stack([bits[..., 0] + 2 * bits[..., 1],
                      bits[..., 2] + 2 * bits[..., 3]], axis=-1)
  nll = -np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
  expected = (nll.mean(-1) * weights).mean(axis=(1, 2))
  np.testing.assert_allclose(per_example, expected, rtol=1e-5)
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)


def test_softmax_xent_gradient_matches_closed_form():
  # d loss / d logits = (softmax - onehot) * weight / (groups * pixels * b).
  output, bits, eps, weights = _random_case(8, num_bits=4, seed=3)
  grad = jax.jit(jax.grad(
      lambda o: _loss(o, bits, eps, weights, 'x_softmax_xent')[0]))(output)
  z = output.reshape(_B, _H, _W, 2, 4).astype(np.float64)
  p = np.exp(_np_log_softmax(z))
  targets = np.stack([bits[..., 0] + 2 * bits[..., 1],
                      bits[..., 2] + 2 * bits[..., 3]], axis=-1)
  expected = (p - np.eye(4)[targets]) * weights[..., None, None] / (
      2 * _H * _W * _B)
  np.testing.assert_allclose(grad, expected.reshape(output.shape), atol=1e-7)


def test_sigmoid_xent_matches_numpy():
  output, bits, eps, weights = _random_case(4)
  _, per_example = _loss(output, bits, eps, weights, 'x_sigmoid_xent')
  p = 1 / (1 + np.exp(-output.astype(np.float64)))
  ce = -(bits * np.log(p) + (1 - bits) * np.log(1 - p))
  expected = (ce.mean(-1) * weights).mean(axis=(1, 2))
  np.testing.assert_allclose(per_example, expected, rtol=1e-5)


@pytest.mark.parametrize(('loss_type', 'kwargs'), [
    ('x', {}), ('eps', {}), ('eps', {'eps_weighted': True})])
def test_l2_losses_match_numpy(loss_type, kwargs):
  output, bits, eps, weights = _random_case(4)
  output = output.astype(np.float16)  # Any dtype; computed in float32.
  loss, per_example = _loss(output, bits, eps, weights, loss_type, scale=0.3,
                            **kwargs)
  target = (2 * bits - 1) * 0.3 if loss_type == 'x' else eps
  sq = (output.astype(np.float64) - target)**2
  if loss_type == 'eps' and not kwargs:
    weights = np.ones_like(weights)  # The reference's unweighted eps.
  expected = (sq.mean(-1) * weights).mean(axis=(1, 2))
  assert loss.dtype == np.float32
  np.testing.assert_allclose(per_example, expected, rtol=1e-5)
  with pytest.raises(ValueError, match='output shape'):
    _loss(output[..., :3], bits, eps, weights, loss_type)


def test_eps_is_unweighted_by_default_and_weighted_as_an_option():
  # One image of 1 x 2 pixels, 2 bits; output 0, so the squared errors are
  # eps**2: pixel losses mean(1, 1) = 1 and mean(4, 4) = 4.
  eps = np.array([[[[1.0, -1.0], [2.0, 2.0]]]], np.float32)
  output = np.zeros_like(eps)
  bits = np.zeros(eps.shape, np.int32)
  for weights, weighted in (([0.5, 1.5], 3.25), ([0.0, 2.0], 4.0)):
    w = np.array([[weights]], np.float32)
    # Default (the reference): (1 + 4) / 2, whatever the weights, padding
    # (weight 0) included.
    loss, per_example = _loss(output, bits, eps, w, 'eps')
    assert float(loss) == 2.5 and per_example.tolist() == [2.5]
    # Option: (w0 * 1 + w1 * 4) / 2.
    loss, _ = _loss(output, bits, eps, w, 'eps', eps_weighted=True)
    assert float(loss) == weighted
  # The x0 types ignore the switch: always weighted. Target -1 (0 bits,
  # scale 1), outputs 0 and 1: pixel losses 1 and 4, (0.5 + 6) / 2.
  w = np.array([[[0.5, 1.5]]], np.float32)
  output_x = np.array([[[[0.0, 0.0], [1.0, 1.0]]]], np.float32)
  for flag in (False, True):
    loss, _ = _loss(output_x, bits, eps, w, 'x', scale=1.0, eps_weighted=flag)
    assert float(loss) == 3.25


def test_bits_from_mask():
  bits = losses.bits_from_mask(np.array([[[5]]]), np.array([[[130]]]))
  np.testing.assert_array_equal(
      bits[0, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1])


def test_predict_x0_softmax_matches_numpy():
  output, _, _, _ = _random_case(8)
  x0 = losses.predict_x0(output, x_t=None, gamma_t=None,
                         loss_type='x_softmax_xent', scale=0.1)
  logits = output.reshape(_B, _H, _W, 2, 4).astype(np.float64)
  p = np.exp(_np_log_softmax(logits))
  # Expected value of bit i of group g: sum over classes k of p_k * bit_i(k).
  expected = np.zeros((_B, _H, _W, 2, 2))
  for k in range(4):
    for i in range(2):
      expected[..., i] += p[..., k] * (2 * ((k >> i) & 1) - 1) * 0.1
  np.testing.assert_allclose(x0, expected.reshape(_B, _H, _W, 4), atol=1e-7)


def test_predict_x0_softmax_is_stable_for_large_logits():
  # Logits far from 0 (float32 exp overflows above ~88) read as the
  # softmax of the shifted logits; a tie between two classes gives the
  # mean of their bits.
  logits = np.full((1, 1, 2, 8), -1e4, np.float32)
  logits[0, 0, 0, [1, 3]] = 500.0     # Group 0: classes 01 and 11 tie.
  logits[0, 0, 0, 4 + 2] = 1e4        # Group 1: class 10.
  logits[0, 0, 1, :4] = 300.0 + np.arange(4)
  logits[0, 0, 1, 4:] = -300.0        # Group 1: uniform (exp underflows).
  x0 = np.asarray(losses.predict_x0(logits, x_t=None, gamma_t=None,
                                    loss_type='x_softmax_xent', scale=0.1))
  assert np.isfinite(x0).all()
  np.testing.assert_allclose(x0[0, 0, 0], [0.1, 0.0, -0.1, 0.1], atol=1e-7)
  p = np.exp(np.arange(4.0) - 3.0) / np.exp(np.arange(4.0) - 3.0).sum()
  bit0 = p[1] + p[3]
  bit1 = p[2] + p[3]
  np.testing.assert_allclose(
      x0[0, 0, 1], [(2 * bit0 - 1) * 0.1, (2 * bit1 - 1) * 0.1, 0.0, 0.0],
      rtol=1e-5, atol=1e-7)


def test_predict_x0_sharp_logits_give_target_bits():
  rng = np.random.RandomState(1)
  semantic = rng.randint(0, 256, size=(2, 2, 3))
  instance = rng.randint(0, 256, size=(2, 2, 3))
  logits = np.concatenate([np.eye(256)[semantic], np.eye(256)[instance]],
                          axis=-1) * 50.0
  x0 = losses.predict_x0(logits, x_t=None, gamma_t=None,
                         loss_type='x_softmax_xent', scale=0.1)
  bits = np.asarray(losses.bits_from_mask(semantic, instance))
  np.testing.assert_allclose(x0, (2 * bits - 1) * 0.1, atol=1e-6)
  # The same bits through the sigmoid reading.
  x0_sig = losses.predict_x0((2 * bits - 1) * 50.0, x_t=None, gamma_t=None,
                             loss_type='x_sigmoid_xent', scale=0.1)
  np.testing.assert_allclose(x0_sig, (2 * bits - 1) * 0.1, atol=1e-6)


def _has_loop(jaxpr: str) -> bool:
  # `lax.fori_loop` with static bounds is a scan in the jaxpr.
  return ' scan[' in jaxpr or ' while[' in jaxpr


def test_readout_rows_is_the_largest_divisor_of_the_height_in_budget():
  # A row of [2, h, 8, 16] float32 logits is 2 * 8 * 16 * 4 = 1 KiB.
  assert losses._block_rows((2, 12, 8, 16), 4 * 1024) == 4
  assert losses._block_rows((2, 12, 8, 16), 5 * 1024) == 4
  assert losses._block_rows((2, 12, 8, 16), 6 * 1024) == 6
  assert losses._block_rows((2, 13, 8, 16), 6 * 1024) == 1   # 13: prime.
  assert losses._block_rows((2, 12, 8, 16), 100) == 1       # < one row.
  assert losses._block_rows((2, 12, 8, 16), 2**20) == 12


@pytest.mark.parametrize('height,block_rows', [(12, 1), (12, 3), (12, 5),
                                               (7, 2)])
def test_blocked_readout_equals_one_pass_and_is_batch_invariant(
    height, block_rows):
  # The logits read in blocks of rows (the CPU default) give the one-pass
  # values, and each image's values do not depend on the batch it is in
  # (the blocks hold whole rows of every image).
  rng = np.random.RandomState(3)
  logits = (rng.randn(3, height, 5, 2 * 16) * 4).astype(np.float32)
  row_bytes = 3 * 5 * 2 * 16 * 4

  def read(x, block_bytes):
    return np.asarray(jax.jit(lambda o: losses.predict_x0(
        o, x_t=None, gamma_t=None, loss_type='x_softmax_xent', scale=0.1,
        block_bytes=block_bytes))(x))

  one_pass = read(logits, None)
  blocked = read(logits, block_rows * row_bytes)
  np.testing.assert_allclose(blocked, one_pass, rtol=0, atol=1e-7)
  for i in range(3):
    np.testing.assert_array_equal(
        read(logits[i:i + 1], block_rows * row_bytes), blocked[i:i + 1])
  # Blocked means a loop over blocks; the one-pass form has none.
  jaxpr = str(jax.make_jaxpr(lambda o: losses.predict_x0(
      o, x_t=None, gamma_t=None, loss_type='x_softmax_xent', scale=0.1,
      block_bytes=row_bytes))(logits))
  assert _has_loop(jaxpr)
  assert not _has_loop(str(jax.make_jaxpr(lambda o: losses.predict_x0(
      o, x_t=None, gamma_t=None, loss_type='x_softmax_xent', scale=0.1,
      block_bytes=None))(logits)))


@pytest.mark.parametrize('dtype', [np.float32, 'bfloat16'])
@pytest.mark.parametrize('block_rows', [1, 3])
def test_blocked_softmax_xent_equals_one_pass_with_gradients(dtype,
                                                             block_rows):
  # The loss read in blocks of rows (the CPU default) has the one-pass
  # value and, through its custom VJP, autodiff's gradients with respect
  # to the logits and the pixel weights, for any cotangent.
  import jax.numpy as jnp
  rng = np.random.RandomState(4)
  b, h, w, groups, classes = 3, 6, 5, 2, 8
  logits = jnp.asarray(rng.randn(b, h, w, groups * classes) * 3, dtype)
  target = jnp.asarray(rng.randint(0, classes, (b, h, w, groups)))
  weights = jnp.asarray(rng.uniform(0.2, 2.0, (b, h, w)), jnp.float32)
  cotangent = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
  block_bytes = block_rows * b * w * groups * classes * 4

  def weighted(block_bytes):
    def f(logits, weights):
      per_example = losses.softmax_xent(logits, target, weights,
                                        groups=groups,
                                        block_bytes=block_bytes)
      return jnp.sum(per_example * cotangent), per_example
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  (_, one_pass), (d_logits, d_weights) = weighted(None)(logits, weights)
  (_, blocked), (d_logits_b, d_weights_b) = weighted(block_bytes)(
      logits, weights)
  assert _has_loop(str(jax.make_jaxpr(
      lambda x: losses.softmax_xent(x, target, weights, groups=groups,
                                    block_bytes=block_bytes))(logits)))
  np.testing.assert_allclose(blocked, one_pass, rtol=1e-6)
  assert d_logits_b.dtype == logits.dtype
  tol = 1e-6 if dtype == np.float32 else 1e-2
  np.testing.assert_allclose(np.float32(d_logits_b), np.float32(d_logits),
                             rtol=tol, atol=tol * 1e-2)
  np.testing.assert_allclose(d_weights_b, d_weights, rtol=1e-6, atol=1e-9)
  # By hand for one pixel: w * (softmax - onehot) / (groups h w) * g.
  p = np.exp(np.float64(np.float32(logits[1, 2, 3, :classes])))
  p /= p.sum()
  p[int(target[1, 2, 3, 0])] -= 1
  np.testing.assert_allclose(
      np.float32(d_logits_b[1, 2, 3, :classes]),
      p * float(weights[1, 2, 3]) / (groups * h * w) * -1.0,
      rtol=max(tol, 1e-5), atol=1e-7)


def test_diffusion_loss_reads_the_logits_in_blocks_on_cpu(monkeypatch):
  output, bits, weights = _blocking_case()
  value = losses.diffusion_loss(
      output, x0_bits=bits, x_t=None, gamma_t=None, eps=None,
      weights=weights, loss_type='x_softmax_xent', scale=0.1,
      block_bytes=None)[0]
  monkeypatch.setattr(losses, 'BLOCK_BYTES', 2 * 4 * 2 * 16 * 4)  # 2 rows.
  blocked = jax.jit(lambda o: losses.diffusion_loss(
      o, x0_bits=bits, x_t=None, gamma_t=None, eps=None, weights=weights,
      loss_type='x_softmax_xent', scale=0.1)[0])
  assert _has_loop(str(jax.make_jaxpr(blocked)(output)))
  np.testing.assert_allclose(blocked(output), value, rtol=1e-6)


def _blocking_case():
  rng = np.random.RandomState(5)
  output = np.float32(rng.randn(2, 6, 4, 2 * 16) * 2)
  bits = rng.randint(0, 2, (2, 6, 4, 8))
  weights = np.float32(rng.uniform(0.5, 1.5, (2, 6, 4)))
  return output, bits, weights


def test_readout_is_blocked_on_cpu_by_default(monkeypatch):
  logits = np.zeros((1, 4, 4, 8), np.float32)
  monkeypatch.setattr(losses, 'BLOCK_BYTES', 4 * 8 * 4)  # A row.
  assert jax.default_backend() == 'cpu'
  jaxpr = str(jax.make_jaxpr(lambda o: losses.predict_x0(
      o, x_t=None, gamma_t=None, loss_type='x_softmax_xent', scale=0.1))(
          logits))
  assert _has_loop(jaxpr)


def test_predict_x0_x_and_eps():
  rng = np.random.RandomState(2)
  x0_true = rng.choice([-0.1, 0.1], size=(2, 2, 2, 4)).astype(np.float32)
  eps = rng.randn(2, 2, 2, 4).astype(np.float32)
  g = np.array([0.7, 0.2], np.float32)
  gb = g[:, None, None, None]
  x_t = np.sqrt(gb) * x0_true + np.sqrt(1 - gb) * eps
  out = losses.predict_x0(eps, x_t=x_t, gamma_t=g, loss_type='eps',
                          scale=0.1)
  np.testing.assert_allclose(out, x0_true, atol=1e-5)
  out = losses.predict_x0(x0_true * 3, x_t=x_t, gamma_t=g, loss_type='x',
                          scale=0.1)
  np.testing.assert_allclose(out, x0_true, atol=1e-7)  # Clipped to +-0.1.


def test_eps_loss_weighted_config_switch_validates():
  from configs import synthetic
  from pix2seq_d_jax import config_lib

  config = synthetic.get_config('tiny')
  assert config.diffusion.eps_loss_weighted is False  # The reference.
  config_lib.validate(config)
  config.diffusion.eps_loss_weighted = True
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.diffusion.eps_loss_weighted=True: "
                     r"expected a bool, True only with "
                     r"diffusion.loss_type='eps'"):
    config_lib.validate(config)
  config.diffusion.loss_type = 'eps'
  config_lib.validate(config)
