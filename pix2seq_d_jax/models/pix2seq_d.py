"""Pix2Seq-D: image encoder, feature-pyramid merge and TransUNet mask decoder.

`encode` runs once per image: ImageNet-normalised pixels → truncated ResNet
(C2, C3, ... maps) → `TokenEncoder` on the last (stride-16) map → pyramid
merge of the earlier ResNet maps and the encoder output on the stride-16 grid,
resized to `mask_size` with `fuse_dim` channels. `decode` runs once per
diffusion step: it concatenates the noisy analog bits x_t, the optional
self-conditioning estimate, the merged features and the optional video
conditioning map on channels and predicts `num_outputs` logits per pixel with
the TransUNet, cross-attending to the encoder tokens when `conditional` is
'cat+attn'. At the defaults (the COCO recipe: image 1024², mask 512²) the
model has 94,492,480 parameters, the count of the official code.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from pix2seq_d_jax import config_lib
from pix2seq_d_jax.models import (
  convolution,
  layers,
  pyramid,
  register,
  resnet,
  transformer,
  transunet,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONDITIONALS = ('cat', 'cat+attn')


@register('pix2seq_d')
class Pix2SeqD(nn.Module):
  """The Pix2Seq-D panoptic mask model (encoder + diffusion decoder).

  Attributes:
    mask_size: (h', w') decoder resolution; a positive integer multiple of the
      stride-4 feature size (H/4, W/4) and divisible by
      2 ** (len(dec_dim_mults) - 1).
    num_bits: analog-bit channels of x_t.
    num_outputs: decoder output channels (logits).
    self_cond: the decoder input also gets an x0 estimate [.., num_bits].
    cond_channels: extra conditioning-map channels (video); 0 = none.
    backbone_depths: bottleneck blocks per ResNet group; the ResNet stops
      after len(backbone_depths) groups.
    backbone_width: stem / first-group width (64 for ResNet-50).
    backbone_norm: 'batch' (running averages in `batch_stats`) or 'group'.
    bn_momentum: batch-norm running-average decay.
    freeze_backbone: run the encoder (ResNet and token transformer) in
      inference mode and stop gradients at its outputs; the pyramid merge and
      the decoder still train.
    enc_layers: transformer-encoder blocks.
    enc_dim: transformer-encoder width (tokens the decoder attends to).
    enc_mlp_dim: transformer-encoder MLP width.
    enc_heads: transformer-encoder heads.
    enc_drop_path: stochastic depth of every encoder residual branch.
    enc_dropout: dropout on encoder input tokens and MLP hidden units (the
      reference's drop_units, 0.1).
    fuse_dim: channels of the merged features given to the decoder.
    dec_dim: TransUNet base width.
    dec_dim_mults: TransUNet channel multipliers per level.
    dec_num_res_blocks: residual blocks per down unit.
    dec_transformer_layers: bottleneck transformer blocks.
    dec_transformer_dim: bottleneck transformer width.
    dec_heads: bottleneck transformer heads.
    dec_mlp_ratio: bottleneck transformer MLP ratio.
    dec_dropout: decoder dropout.
    conditional: 'cat' (features concatenated) or 'cat+attn' (also
      cross-attention to the encoder tokens).
    time_scaling: γ(t) multiplier before the sinusoidal embedding.
    remat_blocks: per-block rematerialisation of every ResNet, encoder,
      U-Net residual and bottleneck transformer block: 'none', 'full'
      (recompute everything) or 'dots' (keep matmul/conv outputs); see
      `layers.REMAT_POLICIES`. Only the backward pass changes; parameters
      and outputs are the same.
    scan_layers: apply the encoder's and the bottleneck's transformer blocks
      as one scanned body each (`transformer.TransformerStack.scan`): a
      shorter compile, the same parameters, checkpoints and initial values.
    dtype: compute dtype, 'float32' or 'bfloat16'; parameters stay float32
      and the decoder output is float32.
    matmul_precision: `jax.default_matmul_precision` while encoding and
      decoding (None: jax's own). 'bfloat16' or 'BF16_BF16_F32' multiplies
      float32 activations as bfloat16 operands accumulated in float32:
      TPU and GPU do that for their matmuls and convolutions, and on CPU
      `accumulation.dot_general` does it for the dense layers and the
      tiled 1×1 convolutions (XLA:CPU itself computes float32).
    conv_impl: how convolutions are computed: 'lax' (`nn.Conv`'s own),
      'tiled' (the same convolutions and parameters with XLA:CPU-friendly
      backward shapes, `convolution.tiled_conv`) or 'auto' ('tiled' on a
      single CPU device, else 'lax').
  """
  mask_size: tuple[int, int]
  num_bits: int = 16
  num_outputs: int = 512
  self_cond: bool = False
  cond_channels: int = 0
  backbone_depths: tuple[int, ...] = (3, 4, 6)
  backbone_width: int = 64
  backbone_norm: str = 'batch'
  bn_momentum: float = 0.9
  freeze_backbone: bool = False
  enc_layers: int = 12
  enc_dim: int = 512
  enc_mlp_dim: int = 2048
  enc_heads: int = 16
  enc_drop_path: float = 0.1
  enc_dropout: float = 0.1
  fuse_dim: int = 256
  dec_dim: int = 128
  dec_dim_mults: tuple[int, ...] = (1, 1, 2, 2)
  dec_num_res_blocks: int = 1
  dec_transformer_layers: int = 6
  dec_transformer_dim: int = 512
  dec_heads: int = 8
  dec_mlp_ratio: int = 4
  dec_dropout: float = 0.0
  conditional: str = 'cat+attn'
  time_scaling: float = 10000.0
  remat_blocks: str = 'none'
  scan_layers: bool = False
  dtype: str = 'float32'
  matmul_precision: str | None = None
  conv_impl: str = 'auto'

  def setup(self):
    self._validate()
    dtype = layers.get_dtype(self.dtype)
    conv_impl = convolution.resolve(
        self.conv_impl, platform=jax.default_backend(),
        num_devices=jax.device_count())
    self.backbone = resnet.ResNet(
        tuple(self.backbone_depths), self.backbone_width, self.backbone_norm,
        self.bn_momentum, remat=self.remat_blocks, dtype=dtype,
        conv_impl=conv_impl)
    self.encoder = transformer.TokenEncoder(
        self.enc_dim, self.enc_layers, self.enc_mlp_dim, self.enc_heads,
        self.enc_dropout, self.enc_drop_path, remat=self.remat_blocks,
        scan=self.scan_layers, dtype=dtype)
    self.pyramid = pyramid.PyramidMerge(
        self.fuse_dim, tuple(self.mask_size), dtype=dtype,
        conv_impl=conv_impl)
    self.decoder = transunet.TransUNet(
        out_dim=self.num_outputs,
        dim=self.dec_dim,
        dim_mults=tuple(self.dec_dim_mults),
        num_res_blocks=self.dec_num_res_blocks,
        transformer_layers=self.dec_transformer_layers,
        transformer_dim=self.dec_transformer_dim,
        num_heads=self.dec_heads,
        mlp_ratio=self.dec_mlp_ratio,
        dropout=self.dec_dropout,
        cross_attention='attn' in self.conditional,
        time_scaling=self.time_scaling,
        remat=self.remat_blocks,
        scan_transformer=self.scan_layers,
        dtype=dtype,
        conv_impl=conv_impl)

  def _validate(self):
    name = type(self).__name__
    if self.conditional not in CONDITIONALS:
      raise ValueError(f'{name}.conditional={self.conditional!r}; expected '
                       f'one of {CONDITIONALS}.')
    if self.remat_blocks not in layers.REMAT_POLICIES:
      raise ValueError(f'{name}.remat_blocks={self.remat_blocks!r}; expected '
                       f'one of {layers.REMAT_POLICIES}.')
    if self.backbone_norm not in resnet.NORMS:
      raise ValueError(f'{name}.backbone_norm={self.backbone_norm!r}; '
                       f'expected one of {resnet.NORMS}.')
    layers.get_dtype(self.dtype)
    if (self.matmul_precision is not None
        and self.matmul_precision not in config_lib.MATMUL_PRECISIONS):
      raise ValueError(f'{name}.matmul_precision={self.matmul_precision!r}; '
                       f'expected None or one of '
                       f'{config_lib.MATMUL_PRECISIONS}.')
    if (len(self.mask_size) != 2 or
        any(int(s) != s or s <= 0 for s in self.mask_size)):
      raise ValueError(f'{name}.mask_size={self.mask_size!r}; expected two '
                       'positive integers (h, w).')
    down = 2 ** (len(self.dec_dim_mults) - 1)
    if any(s % down for s in self.mask_size):
      raise ValueError(
          f'{name}.mask_size={tuple(self.mask_size)} must be divisible by '
          f'2 ** (len(dec_dim_mults) - 1) = {down} '
          f'(dec_dim_mults={tuple(self.dec_dim_mults)}).')
    for field, dim, heads in (
        ('enc', self.enc_dim, self.enc_heads),
        ('dec_transformer', self.dec_transformer_dim, self.dec_heads)):
      if dim % 4 or dim % heads:
        raise ValueError(
            f'{name}.{field}_dim={dim} must be a multiple of 4 (2-D '
            f'positions) and of the head count {heads}.')
    if self.num_bits <= 0 or self.num_outputs <= 0 or self.cond_channels < 0:
      raise ValueError(
          f'{name}: num_bits={self.num_bits} and num_outputs='
          f'{self.num_outputs} must be positive, cond_channels='
          f'{self.cond_channels} non-negative.')

  def _check_image(self, image: jax.Array) -> None:
    name = type(self).__name__
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f'{name}.encode: image must be [b, H, W, 3]; got shape '
                       f'{image.shape}.')
    stride = 2 ** (len(self.backbone_depths) + 1)
    size = image.shape[1:3]
    if size[0] % stride or size[1] % stride:
      raise ValueError(
          f'{name}.encode: image size {size} must be divisible by the '
          f'backbone stride {stride} (backbone_depths='
          f'{tuple(self.backbone_depths)}).')
    c2 = (size[0] // 4, size[1] // 4)
    if any(m % c for m, c in zip(self.mask_size, c2, strict=True)):
      raise ValueError(
          f'{name}.mask_size={tuple(self.mask_size)} must be a positive '
          f'integer multiple of the stride-4 feature size {c2} of the image '
          f'size {size}.')

  def _precision(self) -> contextlib.AbstractContextManager:
    """The matmul precision the model's products are traced under."""
    if self.matmul_precision is None:
      return contextlib.nullcontext()
    return jax.default_matmul_precision(self.matmul_precision)

  def encode(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Encodes images once; the result conditions every decoder step.

    Args:
      image: float32 [b, H, W, 3] in [0, 1]; H, W divisible by
        2 ** (len(backbone_depths) + 1).
      train: batch statistics (updated; needs mutable=['batch_stats']) and
        dropout / drop path (needs a 'dropout' rng) when True.

    Returns:
      {'features': [b, h', w', fuse_dim] merged features at mask_size,
       'tokens': [b, n, enc_dim] transformer-encoder output}, both in the
      compute dtype.

    Raises:
      ValueError: if the image shape does not fit the model.
    """
    self._validate()
    self._check_image(image)
    dtype = layers.get_dtype(self.dtype)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = ((image.astype(jnp.float32) - mean) / std).astype(dtype)
    # A frozen encoder behaves like a non-trainable Keras layer in the
    # reference: batch norm uses its running averages and dropout is off.
    enc_train = train and not self.freeze_backbone
    with self._precision():
      maps = self.backbone(x, train=enc_train)
      tokens = self.encoder(maps[-1], train=enc_train)
      b, h, w, _ = maps[-1].shape
      maps = maps[:-1] + [tokens.reshape(b, h, w, tokens.shape[-1])]
      if self.freeze_backbone:
        maps = [jax.lax.stop_gradient(m) for m in maps]
        tokens = jax.lax.stop_gradient(tokens)
      return {'features': self.pyramid(maps), 'tokens': tokens}

  def decode(self,
             x_t: jax.Array,
             gamma: jax.Array,
             encoded: dict[str, jax.Array],
             *,
             self_cond_x0: jax.Array | None = None,
             cond_map: jax.Array | None = None,
             train: bool) -> jax.Array:
    """Predicts the decoder logits for one diffusion step.

    Args:
      x_t: float32 [b, h', w', num_bits] noisy analog bits.
      gamma: float32 [b], γ(t) per example.
      encoded: the dict returned by `encode`.
      self_cond_x0: float32 [b, h', w', num_bits] x0 estimate; required iff
        self_cond (zeros allowed).
      cond_map: float32 [b, h', w', cond_channels]; required iff
        cond_channels > 0.
      train: enables decoder dropout.

    Returns:
      float32 [b, h', w', num_outputs].

    Raises:
      ValueError: on missing, unexpected or mis-shaped inputs.
    """
    self._validate()
    name = type(self).__name__
    b = x_t.shape[0]
    expected = (b, *self.mask_size, self.num_bits)
    if x_t.shape != expected:
      raise ValueError(f'{name}.decode: x_t shape {x_t.shape}; expected '
                       f'{expected} (mask_size, num_bits).')
    parts = [x_t]
    if self.self_cond:
      if self_cond_x0 is None or self_cond_x0.shape != expected:
        got = None if self_cond_x0 is None else self_cond_x0.shape
        raise ValueError(f'{name}.decode: self_cond=True needs self_cond_x0 '
                         f'of shape {expected}; got {got}.')
      parts.append(self_cond_x0)
    elif self_cond_x0 is not None:
      raise ValueError(f'{name}.decode: self_cond_x0 given but '
                       'self_cond=False.')
    parts.append(layers.constrain(encoded['features'], layers.FEATURES))
    if self.cond_channels > 0:
      want = (b, *self.mask_size, self.cond_channels)
      if cond_map is None or cond_map.shape != want:
        got = None if cond_map is None else cond_map.shape
        raise ValueError(f'{name}.decode: cond_channels={self.cond_channels} '
                         f'needs cond_map of shape {want}; got {got}.')
      parts.append(cond_map)
    elif cond_map is not None:
      raise ValueError(f'{name}.decode: cond_map given but cond_channels=0.')
    dtype = layers.get_dtype(self.dtype)
    x = jnp.concatenate([p.astype(dtype) for p in parts], axis=-1)
    context = encoded['tokens'] if 'attn' in self.conditional else None
    with self._precision():
      return self.decoder(x, gamma.astype(jnp.float32), context, train=train)

  def __call__(self,
               image: jax.Array,
               x_t: jax.Array,
               gamma: jax.Array,
               *,
               self_cond_x0: jax.Array | None = None,
               cond_map: jax.Array | None = None,
               train: bool) -> jax.Array:
    """Encodes the image and decodes one step; used for `init`.

    Args:
      image: float32 [b, H, W, 3] in [0, 1].
      x_t: float32 [b, h', w', num_bits].
      gamma: float32 [b].
      self_cond_x0: see `decode`.
      cond_map: see `decode`.
      train: training mode for both halves.

    Returns:
      float32 [b, h', w', num_outputs].
    """
    encoded = self.encode(image, train=train)
    return self.decode(x_t, gamma, encoded, self_cond_x0=self_cond_x0,
                       cond_map=cond_map, train=train)
