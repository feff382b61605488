"""Training losses of Pix2Seq-D and the x0 estimate derived from model outputs.

The decoder's raw output is read according to `loss_type`. The paper's
choice, 'x_softmax_xent', splits the n analog bits into `softmax_groups`
groups of k = n / groups bits and predicts each group as one 2**k-way softmax
over its bit patterns (for 16 bits and 2 groups: a 256-way softmax for the
semantic byte and one for the instance byte). The alternatives are a per-bit
sigmoid ('x_sigmoid_xent'), L2 regression of the analog x0 ('x') and L2 on
the noise ('eps'). Every pixel's loss of the x0 types is multiplied by a
weight that favours small segments, (1 / (c + 1))**p for a segment of c
pixels, normalised to mean 1 per image (paper Table 5: p = 0.2). 'eps' is the
plain mean squared error over all pixels, as in the reference, which ignores
the weights for it; `eps_weighted=True` (config
`diffusion.eps_loss_weighted`) applies them to 'eps' too, a deviation. The
same readings give the analog x0 estimate the sampler needs at every step
(`predict_x0`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pix2seq_d_jax.diffusion import analog_bits

LOSS_TYPES = ('x_softmax_xent', 'x_sigmoid_xent', 'x', 'eps')


def _check_loss_type(loss_type: str) -> None:
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'loss_type={loss_type!r} is unknown; expected one of '
                     f'{LOSS_TYPES}.')


def num_output_channels(loss_type: str, num_bits: int = 16,
                        softmax_groups: int = 2) -> int:
  """Channels the decoder must output for a loss type.

  Args:
    loss_type: one of LOSS_TYPES.
    num_bits: analog bits per pixel.
    softmax_groups: groups of the 'x_softmax_xent' type.

  Returns:
    softmax_groups * 2**(num_bits // softmax_groups) for 'x_softmax_xent'
    (512 for 16 bits in 2 groups), num_bits otherwise.

  Raises:
    ValueError: unknown loss_type, num_bits < 1, or (softmax only)
      softmax_groups < 1, not dividing num_bits, or groups wider than 16 bits.
  """
  _check_loss_type(loss_type)
  if num_bits < 1:
    raise ValueError(f'num_bits={num_bits} must be >= 1.')
  if loss_type != 'x_softmax_xent':
    return num_bits
  if softmax_groups < 1 or num_bits % softmax_groups:
    raise ValueError(f'softmax_groups={softmax_groups} must be >= 1 and divide '
                     f'num_bits={num_bits}.')
  group_bits = num_bits // softmax_groups
  if group_bits > 16:
    raise ValueError(f'num_bits // softmax_groups = {group_bits} bits per '
                     f'group would need a 2**{group_bits}-way softmax; use '
                     'more softmax_groups (at most 16 bits per group).')
  return softmax_groups * 2**group_bits


def bits_from_mask(semantic: jax.typing.ArrayLike,
                   instance: jax.typing.ArrayLike, *,
                   bits_per_channel: int = 8,
                   code: str = 'binary') -> jax.Array:
  """The target bit vector of a panoptic mask.

  Args:
    semantic: int32 [b, h, w] class per pixel.
    instance: int32 [b, h, w] instance id per pixel.
    bits_per_channel: bits for each of the two channels.
    code: one of analog_bits.BIT_CODES.

  Returns:
    int32 [b, h, w, 2 * bits_per_channel] in {0, 1}, semantic bits first; the
    analog target is (2 * bits - 1) * scale.

  Raises:
    ValueError: semantic and instance shapes differ, or as
      `analog_bits.int_to_bits`.
  """
  if np.shape(semantic) != np.shape(instance):
    raise ValueError(f'bits_from_mask: semantic shape {np.shape(semantic)} != '
                     f'instance shape {np.shape(instance)}.')
  return jnp.concatenate([
      analog_bits.int_to_bits(semantic, bits_per_channel, code),
      analog_bits.int_to_bits(instance, bits_per_channel, code)
  ], axis=-1)


def _group_bits(num_channels: int, softmax_groups: int, where: str) -> int:
  """Bits per softmax group implied by the number of output channels."""
  if softmax_groups < 1 or num_channels % softmax_groups:
    raise ValueError(f'{where}: output has {num_channels} channels, not a '
                     f'multiple of softmax_groups={softmax_groups}.')
  per_group = num_channels // softmax_groups
  k = per_group.bit_length() - 1
  if per_group < 2 or 2**k != per_group:
    raise ValueError(f'{where}: each softmax group has {per_group} logits; '
                     'expected a power of two >= 2.')
  return k


def _broadcast_gamma(gamma_t: jax.typing.ArrayLike, ndim: int) -> jax.Array:
  gamma_t = jnp.asarray(gamma_t, jnp.float32)
  if gamma_t.ndim == 1:
    gamma_t = gamma_t.reshape((-1,) + (1,) * (ndim - 1))
  return gamma_t


def diffusion_loss(output: jax.typing.ArrayLike, *,
                   x0_bits: jax.typing.ArrayLike, x_t: jax.typing.ArrayLike,
                   gamma_t: jax.typing.ArrayLike, eps: jax.typing.ArrayLike,
                   weights: jax.typing.ArrayLike, loss_type: str,
                   scale: float | jax.typing.ArrayLike,
                   softmax_groups: int = 2,
                   eps_weighted: bool = False,
                   block_bytes: int | None | str = 'auto',
                   ) -> tuple[jax.Array, jax.Array]:
  """The (weighted) diffusion loss of one batch.

  Args:
    output: [b, h, w, num_output_channels(loss_type, n, softmax_groups)] the
      decoder's raw output, any float dtype (computed in float32).
    x0_bits: int [b, h, w, n] target bits in {0, 1} (`bits_from_mask`).
    x_t: float32 [b, h, w, n] the noisy input. No loss type reads it; it is
      part of the signature so every loss type is called the same way.
    gamma_t: float32 [b] signal levels; unused like x_t.
    eps: float32 [b, h, w, n] the noise added to x0 (read by 'eps').
    weights: float32 [b, h, w] pixel weights, mean 1 per image (zeros drop
      pixels, e.g. padding). Not read by 'eps' unless `eps_weighted`.
    loss_type: one of LOSS_TYPES.
    scale: the input scaling b of the analog bits (read by 'x').
    softmax_groups: groups of the 'x_softmax_xent' type.
    eps_weighted: 'eps' only. False (the reference): the plain mean over
      all pixels, padding included, as the reference's
      `reduce_mean(square(noise - pred))`; True (a deviation): weighted like
      the x0 types.
    block_bytes: 'x_softmax_xent' only: read the logits in blocks of whole
      rows of about this many bytes (`softmax_xent`); None in one pass;
      'auto': see `resolve_block_bytes`.

  Returns:
    (loss, per_example): per_example float32 [b] is the mean over pixels of
    weight * pixel loss (a weighted mean, as the weights have mean 1; weight
    1 everywhere for unweighted 'eps'); loss is its mean over the batch,
    float32 []. The pixel loss is the mean over groups of the softmax
    cross-entropy, the mean over bits of the sigmoid cross-entropy, or the
    mean over channels of the squared error.

  Raises:
    ValueError: unknown loss_type or inconsistent shapes.
  """
  del x_t, gamma_t  # Uniform signature; no current loss type needs them.
  _check_loss_type(loss_type)
  output = jnp.asarray(output)
  x0_bits = jnp.asarray(x0_bits)
  weights = jnp.asarray(weights, jnp.float32)
  if x0_bits.ndim != 4:
    raise ValueError(f'diffusion_loss: x0_bits must be [b, h, w, n], got '
                     f'shape {x0_bits.shape}.')
  num_bits = x0_bits.shape[-1]
  expected = num_output_channels(loss_type, num_bits, softmax_groups)
  if output.shape != x0_bits.shape[:3] + (expected,):
    raise ValueError(f'diffusion_loss: output shape {output.shape}, expected '
                     f'{x0_bits.shape[:3] + (expected,)} for '
                     f'loss_type={loss_type!r} with {num_bits} bits.')
  if weights.shape != x0_bits.shape[:3]:
    raise ValueError(f'diffusion_loss: weights shape {weights.shape}, '
                     f'expected {x0_bits.shape[:3]}.')
  bits = (x0_bits != 0).astype(jnp.int32)

  if loss_type == 'x_softmax_xent':
    k = num_bits // softmax_groups
    shifts = jnp.arange(k, dtype=jnp.int32)
    target = jnp.sum(
        bits.reshape(bits.shape[:3] + (softmax_groups, k)) << shifts, axis=-1)
    per_example = softmax_xent(
        output, target, weights, groups=softmax_groups,
        block_bytes=resolve_block_bytes(block_bytes))
    return jnp.mean(per_example), per_example
  output = output.astype(jnp.float32)
  if loss_type == 'x_sigmoid_xent':
    # -log sigmoid(z) for a 1 bit, -log sigmoid(-z) for a 0 bit.
    signed = jnp.where(bits == 1, output, -output)
    pixel_loss = jnp.mean(-jax.nn.log_sigmoid(signed), axis=-1)
  elif loss_type == 'x':
    x0 = (2.0 * bits.astype(jnp.float32) - 1.0) * scale
    pixel_loss = jnp.mean(jnp.square(output - x0), axis=-1)
  else:
    eps = jnp.asarray(eps, jnp.float32)
    pixel_loss = jnp.mean(jnp.square(output - eps), axis=-1)
    if not eps_weighted:
      weights = jnp.ones_like(weights)

  per_example = jnp.mean(pixel_loss * weights, axis=(1, 2))
  return jnp.mean(per_example), per_example


# Blocks of the logits on CPU (`softmax_readout`, `softmax_xent`): a few
# MiB, so that a block's passes (maximum, exponentials, sum, ...) read it
# from the cache instead of memory.
BLOCK_BYTES = 4 * 2**20


def resolve_block_bytes(block_bytes: int | None | str) -> int | None:
  """'auto' is `BLOCK_BYTES` on a CPU backend and None (one pass) elsewhere.

  Accelerators' compilers fuse the softmax's passes themselves; on CPU the
  blocks keep them in the cache.
  """
  if block_bytes == 'auto':
    return BLOCK_BYTES if jax.default_backend() == 'cpu' else None
  if block_bytes is not None and (
      isinstance(block_bytes, bool) or not isinstance(block_bytes, int)
      or block_bytes < 1):
    raise ValueError(f"block_bytes={block_bytes!r}: expected 'auto', None "
                     'or a positive int.')
  return block_bytes


def _block_rows(shape: tuple[int, ...], block_bytes: int) -> int:
  """Rows per block: the largest divisor of the height within the budget.

  `shape` is [b, h, w, c] (float32 bytes); a block is whole rows of every
  image, so an image's values do not depend on the batch it is in, and a
  batch sharded over devices stays so.
  """
  b, h, w, c = shape
  row_bytes = max(1, b * w * c * 4)
  fit = max(1, block_bytes // row_bytes)
  return max(r for r in range(1, min(h, fit) + 1) if h % r == 0)


def _rows(x: jax.Array, i: jax.Array, rows: int) -> jax.Array:
  """Block i (of `rows` rows) of a [b, h, ...] array."""
  return jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=1)


def softmax_readout(output: jax.Array, softmax_groups: int, k: int, *,
                    block_bytes: int | None = None) -> jax.Array:
  """P(bit = 1) of each of the groups' k bits: softmax(logits) @ bit table.

  `output` is float32 [b, h, w, groups * 2**k]; returns [b, h, w,
  groups * k]. With `block_bytes`, the logits are read in blocks of whole
  rows (`_block_rows`, a `lax.fori_loop`), each small enough to stay in
  the cache for the softmax's passes: on the paper model's
  [2, 128, 128, 512] logits on a 2-core CPU, 8 against 46 ms, the same
  values (the per-pixel computation is the same; measured bit for bit).
  """
  # The softmax classes are bit patterns read as binary numbers whatever
  # the bit code, so the table is always the binary one.
  table = jnp.asarray(analog_bits.code_table(k, 'binary'), jnp.float32)

  def read(block: jax.Array) -> jax.Array:
    p_one = jax.nn.softmax(_group_logits(block, softmax_groups),
                           axis=-1) @ table
    return p_one.reshape(block.shape[:-1] + (softmax_groups * k,))

  if block_bytes is None:
    return read(output)
  b, h, w, _ = output.shape
  rows = _block_rows(output.shape, block_bytes)
  if rows == h:
    return read(output)

  def body(i: jax.Array, p_one: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(
        p_one, read(_rows(output, i, rows)), i * rows, axis=1)

  return jax.lax.fori_loop(
      0, h // rows, body,
      jnp.zeros((b, h, w, softmax_groups * k), jnp.float32))


def _group_logits(block: jax.Array, groups: int) -> jax.Array:
  """[b, r, w, groups * K] (any float) -> float32 [b, r, w, groups, K]."""
  return block.astype(jnp.float32).reshape(
      block.shape[:-1] + (groups, block.shape[-1] // groups))


def _nll(logits: jax.Array, target: jax.Array) -> jax.Array:
  """-log softmax(logits)[target]: [..., K] and int [...] -> [...]."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_p, target[..., None], axis=-1)[..., 0]


def _xent_sums(output: jax.Array, target: jax.Array, weights: jax.Array,
               groups: int, rows: int) -> jax.Array:
  """Per example, the sum over pixels of weight * sum over groups of nll."""
  b, h = output.shape[:2]

  def body(i: jax.Array, total: jax.Array) -> jax.Array:
    nll = _nll(_group_logits(_rows(output, i, rows), groups),
               _rows(target, i, rows))
    return total + jnp.sum(jnp.sum(nll, -1) * _rows(weights, i, rows),
                           axis=(1, 2))

  return jax.lax.fori_loop(0, h // rows, body, jnp.zeros((b,), jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_xent(output: jax.Array, target: jax.Array, weights: jax.Array,
                  groups: int, rows: int) -> jax.Array:
  h, w = output.shape[1:3]
  return _xent_sums(output, target, weights, groups, rows) / (groups * h * w)


def _blocked_xent_fwd(output, target, weights, groups, rows):
  return (_blocked_xent(output, target, weights, groups, rows),
          (output, target, weights))


def _blocked_xent_bwd(groups, rows, residuals, g):
  """The gradients, block by block from the logits (nothing else kept)."""
  output, target, weights = residuals
  h, w = output.shape[1:3]
  # d per_example / d logit = w * (softmax - onehot) / (groups h w), and
  # d per_example / d weight = (sum over groups of nll) / (groups h w).
  scale = (g / (groups * h * w))[:, None, None]

  def body(i, grads):
    d_output, d_weights = grads
    logits = _group_logits(_rows(output, i, rows), groups)
    target_i = _rows(target, i, rows)
    onehot = jnp.arange(logits.shape[-1]) == target_i[..., None]
    d_logits = ((jax.nn.softmax(logits, axis=-1) - onehot)
                * (_rows(weights, i, rows) * scale)[..., None, None])
    d_output = jax.lax.dynamic_update_slice_in_dim(
        d_output, d_logits.reshape(d_logits.shape[:3] + (-1,)).astype(
            output.dtype), i * rows, axis=1)
    d_weights = jax.lax.dynamic_update_slice_in_dim(
        d_weights, jnp.sum(_nll(logits, target_i), -1) * scale,
        i * rows, axis=1)
    return d_output, d_weights

  d_output, d_weights = jax.lax.fori_loop(
      0, h // rows, body, (jnp.zeros_like(output), jnp.zeros_like(weights)))
  return d_output, None, d_weights


_blocked_xent.defvjp(_blocked_xent_fwd, _blocked_xent_bwd)


def softmax_xent(output: jax.Array, target: jax.Array, weights: jax.Array, *,
                 groups: int, block_bytes: int | None = None) -> jax.Array:
  """Per example: the mean over pixels of weight * mean over groups of nll.

  `output` [b, h, w, groups * K] logits (any float dtype, read in
  float32), `target` int [b, h, w, groups] the class of each group,
  `weights` float32 [b, h, w]; returns float32 [b]. With `block_bytes`,
  the logits are read in blocks of whole rows that stay in the cache
  (`_block_rows`), and the gradient is computed block by block from the
  logits (a custom VJP: softmax minus one-hot, nothing of the forward
  kept): on the paper model's [2, 128, 128, 512] logits on a 2-core CPU,
  the decoder's output product with this loss, value and gradients,
  118 against 151 ms. Reverse mode only (no `jax.jvp` through it).
  """
  if block_bytes is not None:
    rows = _block_rows(output.shape, block_bytes)
    if rows < output.shape[1]:
      return _blocked_xent(output, target, jnp.asarray(weights, jnp.float32),
                           groups, rows)
  nll = _nll(_group_logits(output, groups), target)
  return jnp.mean(jnp.mean(nll, axis=-1) * weights, axis=(1, 2))


def predict_x0(output: jax.typing.ArrayLike, *, x_t: jax.typing.ArrayLike,
               gamma_t: jax.typing.ArrayLike, loss_type: str,
               scale: float | jax.typing.ArrayLike,
               softmax_groups: int = 2,
               block_bytes: int | None | str = 'auto') -> jax.Array:
  """The analog x0 estimate implied by the decoder's output.

  Args:
    output: [b, h, w, c] the decoder's raw output, any float dtype.
    x_t: float32 [b, h, w, n] the noisy input (read by 'eps').
    gamma_t: float32 [b] signal levels, or a scalar (read by 'eps').
    loss_type: one of LOSS_TYPES.
    scale: the input scaling b of the analog bits.
    softmax_groups: groups of the 'x_softmax_xent' type.
    block_bytes: for 'x_softmax_xent', read the logits in blocks of whole
      rows of about this many bytes, one block after another
      (`softmax_readout`); None reads them in one pass; 'auto': see
      `resolve_block_bytes`.

  Returns:
    float32 [b, h, w, n] in [-scale, scale]. Softmax: per group the expected
    analog value of each bit, (softmax(logits) @ binary_table * 2 - 1) *
    scale; sigmoid: (2 * sigmoid(output) - 1) * scale; 'x': output; 'eps':
    (x_t - sqrt(1 - gamma) * output) / sqrt(gamma); the last two clipped to
    [-scale, scale].

  Raises:
    ValueError: unknown loss_type, or an output channel count that does not
      split into softmax groups of 2**k logits.
  """
  _check_loss_type(loss_type)
  output = jnp.asarray(output).astype(jnp.float32)
  if loss_type == 'x_softmax_xent':
    k = _group_bits(output.shape[-1], softmax_groups, 'predict_x0')
    p_one = softmax_readout(output, softmax_groups, k,
                            block_bytes=resolve_block_bytes(block_bytes))
    return (2.0 * p_one - 1.0) * scale
  if loss_type == 'x_sigmoid_xent':
    return (2.0 * jax.nn.sigmoid(output) - 1.0) * scale
  if loss_type == 'x':
    x0 = output
  else:
    x_t = jnp.asarray(x_t, jnp.float32)
    g = _broadcast_gamma(gamma_t, x_t.ndim)
    x0 = (x_t - jnp.sqrt(1.0 - g) * output) / jnp.sqrt(g)
  return jnp.clip(x0, -scale, scale)
