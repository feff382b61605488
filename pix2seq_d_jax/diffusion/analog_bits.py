"""Analog bits: integer panoptic masks as real-valued bit vectors.

Pix2Seq-D diffuses a panoptic mask (a semantic class and an instance id per
pixel) as "analog bits" (Chen, Zhang, Hinton, ICLR 2023): each integer is
written as `bits_per_channel` bits, least-significant bit first (bit i is
`(c >> i) & 1`, as in the reference int2bit), and every bit becomes the real
number `(2 * bit - 1) * scale`. Decoding thresholds at zero and reads the
integers back. Besides the plain binary code (the reference and our default)
the Analog Bits paper studies a Gray code and a randomly permuted code
("UINT8 RAND"); both are available through `code`. The random code is a fixed
permutation drawn from `np.random.RandomState(RAND_CODE_SEED)`, so it is the
same in every process and every run.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

BIT_CODES = ('binary', 'gray', 'rand')

# Seed of the fixed permutation behind the 'rand' code. Changing it changes
# the meaning of every bit a model trained with code='rand' has learned.
RAND_CODE_SEED = 20230101

# Codes computed with shifts fit int32 up to 31 bits; codes that need a table
# (the random permutation, `code_table`) are limited to 2**16 rows.
_MAX_SHIFT_BITS = 31
_MAX_TABLE_BITS = 16


def _check_code(code: str) -> None:
  if code not in BIT_CODES:
    raise ValueError(f'code={code!r} is not a known bit code; expected one of '
                     f'{BIT_CODES}.')


def _check_num_bits(num_bits: int, code: str, *, table: bool = False) -> None:
  _check_code(code)
  limit = _MAX_TABLE_BITS if (table or code == 'rand') else _MAX_SHIFT_BITS
  if (not isinstance(num_bits, (int, np.integer)) or isinstance(num_bits, bool)
      or not 1 <= num_bits <= limit):
    raise ValueError(f'num_bits={num_bits!r} must be a Python int in '
                     f'[1, {limit}] for code={code!r}.')


@functools.cache
def _permutation(num_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """The 'rand' code's permutation of 0..2**num_bits-1 and its inverse."""
  perm = np.random.RandomState(RAND_CODE_SEED).permutation(2**num_bits)
  perm = perm.astype(np.int32)
  inverse = np.argsort(perm).astype(np.int32)
  perm.setflags(write=False)
  inverse.setflags(write=False)
  return perm, inverse


@functools.cache
def code_table(num_bits: int, code: str) -> np.ndarray:
  """The codeword of every integer in [0, 2**num_bits).

  Args:
    num_bits: bits per codeword, 1 to 16.
    code: one of BIT_CODES. binary: the codeword of k is k; gray: k ^ (k >> 1);
      rand: a fixed random permutation of 0..2**num_bits-1 (seed
      RAND_CODE_SEED).

  Returns:
    int32 [2**num_bits, num_bits], read-only (the result is cached): row k is
    the codeword of k, least-significant bit first.

  Raises:
    ValueError: unknown code, or num_bits outside [1, 16].
  """
  _check_num_bits(num_bits, code, table=True)
  k = np.arange(2**num_bits, dtype=np.int32)
  if code == 'binary':
    c = k
  elif code == 'gray':
    c = k ^ (k >> 1)
  else:
    c = _permutation(num_bits)[0]
  table = (c[:, None] >> np.arange(num_bits, dtype=np.int32)) & 1
  table = table.astype(np.int32)
  table.setflags(write=False)
  return table


def int_to_bits(x: jax.typing.ArrayLike, num_bits: int,
                code: str = 'binary') -> jax.Array:
  """Writes integers as bit vectors, least-significant bit first.

  Args:
    x: integer array [...] with values in [0, 2**num_bits). For concrete
      numpy / Python input, values outside that range raise; for jax arrays
      (traced or not, so nothing syncs with the device) they are clipped into
      the range first, i.e. negative values encode 0 and values above the
      range encode 2**num_bits - 1.
    num_bits: bits per integer (Python int; at most 16 for code='rand', 31
      otherwise).
    code: one of BIT_CODES.

  Returns:
    int32 [..., num_bits] with values in {0, 1}.

  Raises:
    ValueError: unknown code, bad num_bits, or out-of-range concrete values.
    TypeError: x is not an integer array.
  """
  _check_num_bits(num_bits, code)
  if isinstance(x, (np.ndarray, np.generic, int, list, tuple)):
    x_np = np.asarray(x)
    if not np.issubdtype(x_np.dtype, np.integer):
      raise TypeError(f'int_to_bits: x must hold integers, got dtype '
                      f'{x_np.dtype}.')
    if x_np.size and (x_np.min() < 0 or x_np.max() >= 2**num_bits):
      raise ValueError(
          f'int_to_bits: x has values in [{x_np.min()}, {x_np.max()}], '
          f'expected [0, {2**num_bits - 1}] for num_bits={num_bits}.')
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f'int_to_bits: x must hold integers, got dtype {x.dtype}.')
  x = jnp.clip(x.astype(jnp.int32), 0, 2**num_bits - 1)
  if code == 'gray':
    x = x ^ (x >> 1)
  elif code == 'rand':
    # Gathering the codeword as one int32 and shifting is the same as
    # gathering a row of code_table, with num_bits times less data.
    x = jnp.asarray(_permutation(num_bits)[0])[x]
  shifts = jnp.arange(num_bits, dtype=jnp.int32)
  return (x[..., None] >> shifts) & 1


def bits_to_int(bits: jax.typing.ArrayLike, code: str = 'binary') -> jax.Array:
  """Reads bit vectors (least-significant bit first) back as integers.

  The inverse of `int_to_bits` for the same code.

  Args:
    bits: int or bool [..., n], nonzero meaning 1; n at most 16 for
      code='rand', 31 otherwise.
    code: one of BIT_CODES.

  Returns:
    int32 [...], values in [0, 2**n).

  Raises:
    ValueError: unknown code or unsupported n.
    TypeError: bits are floating point (threshold analog bits first).
  """
  bits = jnp.asarray(bits)
  if not (jnp.issubdtype(bits.dtype, jnp.integer) or bits.dtype == jnp.bool_):
    raise TypeError(f'bits_to_int: bits must be int or bool, got dtype '
                    f'{bits.dtype}; threshold analog bits with `> 0` first.')
  if bits.ndim < 1:
    raise ValueError('bits_to_int: bits must have a trailing bit axis, got a '
                     'scalar.')
  num_bits = bits.shape[-1]
  _check_num_bits(num_bits, code)
  bits = (bits != 0).astype(jnp.int32)
  if code == 'gray':
    # Binary bit i is the xor of Gray bits i..n-1 (the more significant ones).
    bits = jnp.cumsum(bits[..., ::-1], axis=-1)[..., ::-1] % 2
  shifts = jnp.arange(num_bits, dtype=jnp.int32)
  value = jnp.sum(bits << shifts, axis=-1, dtype=jnp.int32)
  if code == 'rand':
    value = jnp.asarray(_permutation(num_bits)[1])[value]
  return value


def channel_scales(bit_scale: float, instance_bit_scale: float | None,
                   bits_per_channel: int) -> float | np.ndarray:
  """The input scaling of each analog bit: one b, or one per channel.

  The paper scales every bit by one b (`bit_scale`). A separate
  `instance_bit_scale` (not in the paper; an option of this framework)
  gives the instance channel's bits their own b, so that the semantic bits
  can keep a low signal-to-noise ratio while the instance bits do not.
  Everything that reads a scale (targets, x0 estimates, clipping, video
  conditioning maps) broadcasts it over the last (bit) axis.

  Args:
    bit_scale: b of the semantic channel (of every bit when
      `instance_bit_scale` is None).
    instance_bit_scale: b of the instance channel, or None.
    bits_per_channel: bits of each channel.

  Returns:
    `bit_scale` as a float when there is one b (or both are equal), else a
    float32 [2 * bits_per_channel] vector, semantic bits first.
  """
  if instance_bit_scale is None or instance_bit_scale == bit_scale:
    return float(bit_scale)
  return np.repeat(np.asarray([bit_scale, instance_bit_scale], np.float32),
                   bits_per_channel)


def mask_to_analog_bits(semantic: jax.typing.ArrayLike,
                        instance: jax.typing.ArrayLike, *,
                        bits_per_channel: int = 8,
                        scale: float | np.ndarray = 0.1,
                        code: str = 'binary') -> jax.Array:
  """Turns a panoptic mask into analog bits.

  Args:
    semantic: int32 [b, h, w] class per pixel, in [0, 2**bits_per_channel).
    instance: int32 [b, h, w] instance id per pixel, same range.
    bits_per_channel: bits for each of the two channels.
    scale: the input scaling b; bits map to -scale and +scale (a
      [2 * bits_per_channel] vector gives each bit its own, see
      `channel_scales`).
    code: one of BIT_CODES.

  Returns:
    float32 [b, h, w, 2 * bits_per_channel]: the semantic channel's bits, then
    the instance channel's bits, each bit as (2 * bit - 1) * scale.

  Raises:
    ValueError: semantic and instance shapes differ, or as `int_to_bits`.
  """
  if np.shape(semantic) != np.shape(instance):
    raise ValueError(f'mask_to_analog_bits: semantic shape '
                     f'{np.shape(semantic)} != instance shape '
                     f'{np.shape(instance)}.')
  bits = jnp.concatenate([
      int_to_bits(semantic, bits_per_channel, code),
      int_to_bits(instance, bits_per_channel, code)
  ], axis=-1)
  return (2.0 * bits.astype(jnp.float32) - 1.0) * scale


def analog_bits_to_mask(analog: jax.typing.ArrayLike, *,
                        bits_per_channel: int = 8, num_classes: int,
                        max_instances: int,
                        code: str = 'binary') -> tuple[jax.Array, jax.Array]:
  """Decodes analog bits into a panoptic mask.

  Args:
    analog: float [b, h, w, 2 * bits_per_channel] analog bits (semantic
      channel first), e.g. the sampler's final x0 estimate.
    bits_per_channel: bits for each of the two channels.
    num_classes: semantic values are clipped to num_classes - 1.
    max_instances: instance ids are clipped to max_instances - 1.
    code: one of BIT_CODES.

  Returns:
    (semantic, instance), each int32 [b, h, w].

  Raises:
    ValueError: the last axis is not 2 * bits_per_channel, or num_classes /
      max_instances < 1.
  """
  analog = jnp.asarray(analog)
  if analog.ndim < 1 or analog.shape[-1] != 2 * bits_per_channel:
    raise ValueError(f'analog_bits_to_mask: analog shape {analog.shape} must '
                     f'end in 2 * bits_per_channel = {2 * bits_per_channel}.')
  if num_classes < 1 or max_instances < 1:
    raise ValueError(f'analog_bits_to_mask: num_classes={num_classes} and '
                     f'max_instances={max_instances} must both be >= 1.')
  bits = analog > 0
  semantic = bits_to_int(bits[..., :bits_per_channel], code)
  instance = bits_to_int(bits[..., bits_per_channel:], code)
  return (jnp.minimum(semantic, num_classes - 1),
          jnp.minimum(instance, max_instances - 1))
