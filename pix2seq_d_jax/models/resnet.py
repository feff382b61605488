"""Truncated bottleneck ResNet, the convolutional half of the image encoder.

ResNet-50 v1.5 (stride on the 3×3 conv): a 7×7/2 stem conv, norm, ReLU and a
3×3/2 max-pool, then bottleneck block groups of widths 64, 128, 256, ... ×4
output channels. Pix2Seq-D keeps only the first three groups (3, 4, 6 blocks;
'c4' in the reference), so the last map has stride 16 and 1024 channels; the
outputs of every group are returned for the feature-pyramid merge. Strided
convs pad symmetrically by (k - 1) // 2 like the reference's fixed padding.
Norms are batch norm (running averages in `batch_stats`, momentum 0.9) or
stateless group norm.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pix2seq_d_jax.models import layers

# Keras VarianceScaling() defaults: scale 1, fan-in, truncated normal.
_CONV_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
NORMS = ('batch', 'group')


def _fixed_padding(kernel_size: int, strides: int):
  if strides == 1:
    return 'SAME'
  total = kernel_size - 1
  return ((total // 2, total - total // 2),) * 2


class _NormAct(nn.Module):
  """Batch or group norm, optionally followed by ReLU."""
  norm: str
  relu: bool = True
  zero_init: bool = False
  bn_momentum: float = 0.9
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.norm == 'batch':
      x = layers.batch_norm(train=train, momentum=self.bn_momentum,
                            zero_init=self.zero_init, dtype=self.dtype,
                            name='bn')(x)
    else:
      x = layers.group_norm(x.shape[-1], zero_init=self.zero_init,
                            dtype=self.dtype, name='gn')(x)
    return nn.relu(x) if self.relu else x


class BottleneckBlock(nn.Module):
  """1×1 → 3×3 (strided) → 1×1 (×4 channels) with a projection shortcut.

  The last norm starts at zero so each block begins as its shortcut.

  Attributes:
    filters: bottleneck width (output is 4 × filters).
    strides: stride of the 3×3 conv and of the projection.
    projection: use a 1×1 conv + norm shortcut (first block of a group).
    norm: 'batch' or 'group'.
    bn_momentum: batch-norm running-average decay.
    dtype: compute dtype.
    conv_impl: convolution implementation, 'lax' or 'tiled' (see
      `convolution.resolve`).
  """
  filters: int
  strides: int = 1
  projection: bool = False
  norm: str = 'batch'
  bn_momentum: float = 0.9
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = 'lax'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps x: [b, h, w, c] to [b, h / strides, w / strides, 4 filters].

    `train` is positional so that `layers.remat` can mark it static.
    """
    def conv(features, kernel, strides, name):
      return layers.conv(features, kernel, strides=strides,
                         padding=_fixed_padding(kernel, strides),
                         use_bias=False, kernel_init=_CONV_INIT,
                         dtype=self.dtype, conv_impl=self.conv_impl,
                         name=name)

    def norm(relu, name, zero_init=False):
      return _NormAct(self.norm, relu, zero_init, self.bn_momentum,
                      self.dtype, name=name)

    shortcut = x
    if self.projection:
      shortcut = conv(4 * self.filters, 1, self.strides, 'proj_conv')(x)
      shortcut = norm(False, 'proj_norm')(shortcut, train=train)
    y = conv(self.filters, 1, 1, 'conv0')(x)
    y = norm(True, 'norm0')(y, train=train)
    y = conv(self.filters, 3, self.strides, 'conv1')(y)
    y = norm(True, 'norm1')(y, train=train)
    y = conv(4 * self.filters, 1, 1, 'conv2')(y)
    y = norm(False, 'norm2', zero_init=True)(y, train=train)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Bottleneck ResNet truncated after len(depths) block groups.

  Attributes:
    depths: blocks per group; (3, 4, 6) is ResNet-50 up to stride 16.
    width: stem / first-group bottleneck width (64 for ResNet-50).
    norm: 'batch' (stateful, `batch_stats`) or 'group'.
    bn_momentum: batch-norm running-average decay.
    remat: per-block rematerialisation, one of `layers.REMAT_POLICIES`.
    dtype: compute dtype.
    conv_impl: convolution implementation, 'lax' or 'tiled' (see
      `convolution.resolve`).
  """
  depths: Sequence[int] = (3, 4, 6)
  width: int = 64
  norm: str = 'batch'
  bn_momentum: float = 0.9
  remat: str = 'none'
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = 'lax'

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> list[jax.Array]:
    """Runs the ResNet.

    Args:
      image: [b, H, W, 3] normalised image (H, W divisible by
        2 ** (len(depths) + 1)).
      train: batch statistics (and their update) vs running averages.

    Returns:
      One map per block group, group i with stride 2 ** (i + 2) and
      4 · width · 2 ** i channels.

    Raises:
      ValueError: on an unknown norm or empty depths.
    """
    if self.norm not in NORMS:
      raise ValueError(f'ResNet.norm={self.norm!r}; expected one of {NORMS}.')
    if not self.depths:
      raise ValueError('ResNet.depths must name at least one block group.')
    x = layers.conv(self.width, 7, strides=2, padding=_fixed_padding(7, 2),
                    use_bias=False, kernel_init=_CONV_INIT, dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name='stem_conv')(image.astype(self.dtype))
    x = _NormAct(self.norm, True, False, self.bn_momentum, self.dtype,
                 name='stem_norm')(x, train=train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    x = layers.constrain(x, layers.FEATURES)
    block = layers.remat(BottleneckBlock, self.remat, static_argnums=(2,))
    outputs = []
    for i, depth in enumerate(self.depths):
      for j in range(depth):
        x = block(
            self.width * 2 ** i,
            strides=2 if (i > 0 and j == 0) else 1,
            projection=j == 0,
            norm=self.norm,
            bn_momentum=self.bn_momentum,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
            name=f'group{i + 1}_block{j + 1}')(x, train)
        x = layers.constrain(x, layers.FEATURES)
      outputs.append(x)
    return outputs
