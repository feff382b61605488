"""Feature-pyramid merge: multi-scale encoder maps to one mask-resolution map.

Top-down, as the reference's `FeaturePyramidMerge`: starting from the
coarsest map, each step projects the running map to the next finer map's
width (1×1 conv, GroupNorm, SiLU), upsamples it by nearest neighbour to that
map's size, adds the finer map and fuses (3×3 conv, GroupNorm, SiLU). A last
such step without a finer map upsamples to the mask size with `out_dim`
channels. That last step is skipped when the finest map already has the mask
size and `out_dim` channels (as in the reference, where it is skipped whenever
the size matches; the channel condition is ours so the output width is always
`out_dim`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pix2seq_d_jax.models import layers


def upsample_nearest(x: jax.Array, factor: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour upsampling by integer factors.

  Args:
    x: [b, h, w, c].
    factor: (fh, fw) positive integers.

  Returns:
    [b, h·fh, w·fw, c], each input pixel repeated in an fh×fw block.
  """
  fh, fw = factor
  if fh > 1:
    x = jnp.repeat(x, fh, axis=1)
  if fw > 1:
    x = jnp.repeat(x, fw, axis=2)
  return x


def integer_factor(target: Sequence[int], source: Sequence[int],
                   what: str) -> tuple[int, int]:
  """Per-axis integer upsampling factor from source (h, w) to target (h, w).

  Args:
    target: (h, w) larger or equal size.
    source: (h, w) smaller or equal size.
    what: names the two sizes in the error message.

  Returns:
    (target_h // source_h, target_w // source_w), both >= 1.

  Raises:
    ValueError: if a target side is not a positive multiple of the source.
  """
  factors = []
  for t, s in zip(target, source, strict=True):
    if s <= 0 or t < s or t % s:
      raise ValueError(
          f'{what}: size {tuple(target)} must be a positive integer multiple '
          f'of {tuple(source)}.')
    factors.append(t // s)
  return tuple(factors)


class UpsampleMerge(nn.Module):
  """One top-down step: project, upsample, add the finer map, fuse.

  Attributes:
    dim: output channels.
    factor: (fh, fw) upsampling of the coarse map.
    dtype: compute dtype.
    conv_impl: convolution implementation, 'lax' or 'tiled' (see
      `convolution.resolve`).
  """
  dim: int
  factor: tuple[int, int]
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = 'lax'

  @nn.compact
  def __call__(self, fine: jax.Array | None, coarse: jax.Array) -> jax.Array:
    """Merges coarse: [b, h, w, c] into fine: [b, h·fh, w·fw, c_f] (or None).

    Returns:
      [b, h·fh, w·fw, dim].
    """
    width = self.dim if fine is None else fine.shape[-1]
    y = layers.conv(width, 1, dtype=self.dtype, conv_impl=self.conv_impl,
                    name='conv1')(coarse)
    y = nn.silu(layers.group_norm(width, dtype=self.dtype, name='norm1')(y))
    y = upsample_nearest(y, self.factor)
    if fine is not None:
      y = y + fine.astype(y.dtype)
    y = layers.conv(self.dim, 3, dtype=self.dtype, conv_impl=self.conv_impl,
                    name='conv2')(y)
    return nn.silu(layers.group_norm(self.dim, dtype=self.dtype,
                                     name='norm2')(y))


class PyramidMerge(nn.Module):
  """Merges maps (finest first) top-down and resizes to out_size.

  Attributes:
    out_dim: output channels (`fuse_dim`, 256 in the reference).
    out_size: (h', w') output size; a positive integer multiple of the finest
      map's size.
    dtype: compute dtype.
    conv_impl: convolution implementation, 'lax' or 'tiled' (see
      `convolution.resolve`).
  """
  out_dim: int
  out_size: tuple[int, int]
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = 'lax'

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array]) -> jax.Array:
    """Merges the pyramid.

    Args:
      maps: [b, h_i, w_i, c_i] maps ordered finest to coarsest, each finer
        size an integer multiple of the next coarser one.

    Returns:
      [b, h', w', out_dim] in the compute dtype.

    Raises:
      ValueError: if the sizes are not integer multiples of each other.
    """
    x = maps[-1].astype(self.dtype)
    for i in range(len(maps) - 1, 0, -1):
      fine = maps[i - 1]
      factor = integer_factor(fine.shape[1:3], x.shape[1:3],
                              f'PyramidMerge map {i - 1}')
      x = UpsampleMerge(fine.shape[-1], factor, dtype=self.dtype,
                        conv_impl=self.conv_impl,
                        name=f'merge_{i}')(fine.astype(self.dtype), x)
    factor = integer_factor(self.out_size, x.shape[1:3],
                            'PyramidMerge out_size')
    if factor != (1, 1) or x.shape[-1] != self.out_dim:
      x = UpsampleMerge(self.out_dim, factor, dtype=self.dtype,
                        conv_impl=self.conv_impl, name='merge_0')(None, x)
    return layers.constrain(x, layers.FEATURES)
