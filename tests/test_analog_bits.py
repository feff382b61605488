"""Tests of pix2seq_d_jax.diffusion.analog_bits: bit codes, mask round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pix2seq_d_jax.diffusion import analog_bits


@pytest.mark.parametrize('code', analog_bits.BIT_CODES)
def test_round_trip_all_bytes(code):
  values = np.arange(256, dtype=np.int32)
  bits = analog_bits.int_to_bits(values, 8, code)
  assert bits.shape == (256, 8) and bits.dtype == jnp.int32
  np.testing.assert_array_equal(bits, analog_bits.code_table(8, code))
  np.testing.assert_array_equal(analog_bits.bits_to_int(bits, code), values)
  # Bool input decodes the same.
  np.testing.assert_array_equal(
      analog_bits.bits_to_int(np.asarray(bits).astype(bool), code), values)


def test_binary_table_matches_unpackbits():
  expected = np.unpackbits(
      np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder='little')
  np.testing.assert_array_equal(analog_bits.code_table(8, 'binary'), expected)
  # Hand case, least-significant bit first: 6 = 0b110.
  np.testing.assert_array_equal(analog_bits.int_to_bits(6, 4), [0, 1, 1, 0])


def test_gray_neighbours_differ_in_one_bit():
  table = analog_bits.code_table(8, 'gray')
  changes = np.abs(np.diff(table, axis=0)).sum(axis=1)
  np.testing.assert_array_equal(changes, np.ones(255))
  # Gray code of 2 is 0b11, of 3 is 0b10.
  np.testing.assert_array_equal(table[2], [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(table[3], [0, 1, 0, 0, 0, 0, 0, 0])


def test_rand_code_is_fixed_permutation():
  table = analog_bits.code_table(8, 'rand')
  codewords = (table << np.arange(8)).sum(axis=1)
  expected = np.random.RandomState(
      analog_bits.RAND_CODE_SEED).permutation(256)
  np.testing.assert_array_equal(codewords, expected)
  assert not np.array_equal(codewords, np.arange(256))
  # The cached table cannot be corrupted by callers.
  with pytest.raises(ValueError):
    table[0, 0] = 1


def test_jit_clips_out_of_range_and_numpy_raises():
  to_bits = jax.jit(analog_bits.int_to_bits, static_argnums=(1, 2))
  out = to_bits(jnp.array([-3, 300]), 8, 'binary')
  np.testing.assert_array_equal(out[0], np.zeros(8))
  np.testing.assert_array_equal(out[1], np.ones(8))
  with pytest.raises(ValueError, match='expected \\[0, 255\\]'):
    analog_bits.int_to_bits(np.array([0, 256]), 8)
  with pytest.raises(ValueError, match='binary'):
    analog_bits.code_table(8, 'hamming')
  with pytest.raises(TypeError):
    analog_bits.bits_to_int(np.array([0.1, -0.1]))


@pytest.mark.parametrize('code', analog_bits.BIT_CODES)
def test_mask_analog_round_trip(code):
  rng = np.random.RandomState(0)
  semantic = rng.randint(0, 134, size=(2, 3, 5)).astype(np.int32)
  instance = rng.randint(0, 101, size=(2, 3, 5)).astype(np.int32)
  analog = analog_bits.mask_to_analog_bits(
      semantic, instance, bits_per_channel=8, scale=0.1, code=code)
  assert analog.shape == (2, 3, 5, 16) and analog.dtype == jnp.float32
  np.testing.assert_allclose(np.abs(analog), 0.1)
  expected_bits = np.concatenate([
      analog_bits.code_table(8, code)[semantic],
      analog_bits.code_table(8, code)[instance]
  ], axis=-1)
  np.testing.assert_allclose(analog, (2 * expected_bits - 1) * 0.1)
  sem, inst = analog_bits.analog_bits_to_mask(
      analog, bits_per_channel=8, num_classes=134, max_instances=101,
      code=code)
  np.testing.assert_array_equal(sem, semantic)
  np.testing.assert_array_equal(inst, instance)


def test_decode_clips_hand_case():
  # Semantic 200 and instance 150 exceed num_classes=134, max_instances=101.
  analog = analog_bits.mask_to_analog_bits(
      np.array([[[200, 5]]]), np.array([[[150, 7]]]), scale=0.3)
  sem, inst = analog_bits.analog_bits_to_mask(
      analog, num_classes=134, max_instances=101)
  np.testing.assert_array_equal(sem, [[[133, 5]]])
  np.testing.assert_array_equal(inst, [[[100, 7]]])
  with pytest.raises(ValueError, match='2 \\* bits_per_channel'):
    analog_bits.analog_bits_to_mask(
        analog[..., :8], num_classes=134, max_instances=101)


def test_channel_scales_one_b_or_one_per_channel():
  assert analog_bits.channel_scales(0.1, None, 3) == 0.1
  assert analog_bits.channel_scales(0.5, 0.5, 3) == 0.5
  np.testing.assert_array_equal(
      analog_bits.channel_scales(0.1, 1.0, 3),
      np.float32([0.1, 0.1, 0.1, 1.0, 1.0, 1.0]))


def test_per_channel_scale_encodes_and_decodes_each_channel():
  # Semantic 5 = bits 1,0,1 (LSB first), instance 2 = bits 0,1,0.
  scale = analog_bits.channel_scales(0.1, 1.0, 3)
  analog = analog_bits.mask_to_analog_bits(
      np.array([[[5]]]), np.array([[[2]]]), bits_per_channel=3, scale=scale)
  np.testing.assert_allclose(
      np.asarray(analog)[0, 0, 0], [0.1, -0.1, 0.1, -1.0, 1.0, -1.0])
  semantic, instance = analog_bits.analog_bits_to_mask(
      analog, bits_per_channel=3, num_classes=8, max_instances=8)
  assert (int(semantic[0, 0, 0]), int(instance[0, 0, 0])) == (5, 2)
