"""Transformer pieces of Pix2Seq-D: attention, blocks, drop path, positions.

The image encoder turns the stride-16 ResNet map into tokens and runs a
pre-norm transformer encoder over them (`TokenEncoder`); the TransUNet
bottleneck runs a pre-norm `TransformerStack` whose blocks self-attend and,
when conditioned, cross-attend to the encoder tokens.
Positions are fixed sinusoids (`sinusoidal_1d`, `sinusoidal_2d`) with the
reference's layout: all sines first, then all cosines, and 2-D codes that give
the first half of the channels to rows and the second half to columns.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pix2seq_d_jax.models import layers


def sinusoidal_1d(positions: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal code of real-valued positions (sines first, then cosines).

  Channel k < dim/2 is sin(p * 10000^(-2k/dim)); channel dim/2 + k is the
  cosine at the same frequency.

  Args:
    positions: float32 [...], positions (or scaled scalars such as γ·10000).
    dim: code width; must be even.

  Returns:
    float32 [..., dim].

  Raises:
    ValueError: if dim is odd.
  """
  if dim % 2:
    raise ValueError(f'sinusoidal_1d: dim={dim} must be even.')
  half = dim // 2
  rates = 1.0 / (10000.0 ** (2.0 * jnp.arange(half, dtype=jnp.float32) / dim))
  angles = positions.astype(jnp.float32)[..., None] * rates
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sinusoidal_2d(height: int,
                  width: int,
                  dim: int,
                  normalization_max: float = 2 * math.pi) -> jax.Array:
  """Sinusoidal 2-D position code of a height×width grid, flattened row-major.

  Row and column indices are rescaled to [0, normalization_max]; the first
  dim/2 channels encode the row, the last dim/2 the column (zeros elsewhere,
  then summed), as in the reference. A grid side of 1 maps to position 0.

  Args:
    height: grid rows.
    width: grid columns.
    dim: code width; must be a multiple of 4.
    normalization_max: coordinate range after rescaling.

  Returns:
    float32 [height * width, dim].

  Raises:
    ValueError: if dim is not a multiple of 4.
  """
  if dim % 4:
    raise ValueError(f'sinusoidal_2d: dim={dim} must be a multiple of 4.')
  half = dim // 2

  def axis_code(n):
    coords = jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)
    return sinusoidal_1d(coords * normalization_max, half)

  rows = jnp.broadcast_to(axis_code(height)[:, None, :], (height, width, half))
  cols = jnp.broadcast_to(axis_code(width)[None, :, :], (height, width, half))
  return jnp.concatenate([rows, cols], axis=-1).reshape(height * width, dim)


class DropPath(nn.Module):
  """Stochastic depth: zeroes a whole residual branch per example.

  Kept examples are scaled by 1 / (1 - rate) so the expectation is unchanged.
  The mask comes from the 'dropout' rng.

  Attributes:
    rate: probability of dropping the branch, in [0, 1).
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Applies drop path to x: [b, ...]; identity when not training."""
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f'DropPath.rate={self.rate} must be in [0, 1).')
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with biased q/k/v/out projections.

  The inner width equals the query width (heads of query_dim / num_heads),
  as in Keras' MultiHeadAttention with key_dim = dim // heads. Logits and the
  softmax are computed in float32 even for bfloat16 inputs; the softmax is
  differentiated by its closed form (`jax.softmax_custom_jvp`).

  Attributes:
    num_heads: number of heads; must divide the query width.
    dtype: compute dtype.
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self,
               x: jax.Array,
               context: jax.Array | None = None) -> jax.Array:
    """Attends from x to context (self-attention when context is None).

    Args:
      x: [b, t, d] queries.
      context: [b, s, d_c] keys/values source, or None for x itself.

    Returns:
      [b, t, d] in the compute dtype.
    """
    context = x if context is None else context
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'MultiHeadAttention: width {dim} is not divisible by '
                       f'num_heads={self.num_heads}.')
    head_dim = dim // self.num_heads

    def project(inputs, name):
      y = layers.dense(dim, ('embed', 'heads'), dtype=self.dtype,
                       name=name)(inputs)
      return y.reshape(y.shape[:-1] + (self.num_heads, head_dim))

    q = project(x, 'query')
    k = project(context, 'key')
    v = project(context, 'value')
    # jax's default softmax is differentiated through exp, sum and divide;
    # its custom-JVP form keeps only the probabilities and gives the
    # backward pass y·(g − Σ g·y) (same values; the attention's backward
    # pass 30% faster on CPU at these shapes).
    with jax.softmax_custom_jvp(True):
      out = jax.nn.dot_product_attention(q, k, v)
    out = out.reshape(out.shape[:-2] + (dim,))
    return layers.dense(dim, ('heads', 'embed'), dtype=self.dtype,
                        name='out')(out)


class Mlp(nn.Module):
  """Transformer feed-forward: dense, exact GELU, dropout, dense.

  Attributes:
    mlp_dim: hidden width.
    dropout: dropout rate on the hidden units.
    dtype: compute dtype.
  """
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps x: [b, t, d] to [b, t, d]."""
    dim = x.shape[-1]
    h = layers.dense(self.mlp_dim, ('embed', 'mlp'), dtype=self.dtype,
                     name='dense1')(x)
    h = layers.constrain(nn.gelu(h, approximate=False), layers.MLP_HIDDEN)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return layers.dense(dim, ('mlp', 'embed'), dtype=self.dtype,
                        name='dense2')(h)


class TransformerBlock(nn.Module):
  """Pre-norm transformer block: self-attention, cross-attention?, MLP.

  Each sub-layer is x + drop_path(f(LayerNorm(x))). Cross-attention reads the
  context as given (no extra norm), as in the reference decoder.

  Attributes:
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    dropout: MLP hidden dropout.
    drop_path: stochastic-depth rate of every residual branch.
    cross_attention: add a cross-attention sub-layer (needs a context).
    dtype: compute dtype.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  drop_path: float = 0.0
  cross_attention: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self,
               x: jax.Array,
               context: jax.Array | None,
               train: bool) -> jax.Array:
    """Maps x: [b, t, d] (and context [b, s, d_c] or None) to [b, t, d].

    `train` is positional so that `layers.remat` can mark it static.
    """
    drop = DropPath(self.drop_path)
    y = layers.layer_norm(dtype=self.dtype, name='self_attn_ln')(x)
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype,
                           name='self_attn')(y)
    x = x + drop(y, train=train)
    if self.cross_attention:
      if context is None:
        raise ValueError('TransformerBlock(cross_attention=True) needs a '
                         'context [b, s, d]; got None.')
      y = layers.layer_norm(dtype=self.dtype, name='cross_attn_ln')(x)
      y = MultiHeadAttention(self.num_heads, dtype=self.dtype,
                             name='cross_attn')(y, context.astype(self.dtype))
      x = x + drop(y, train=train)
    y = layers.layer_norm(dtype=self.dtype, name='mlp_ln')(x)
    y = Mlp(self.mlp_dim, self.dropout, dtype=self.dtype, name='mlp')(
        y, train=train)
    return x + drop(y, train=train)


class TransformerStack(nn.Module):
  """A stack of `TransformerBlock`s (no final norm; the caller adds one).

  The blocks' parameters are always stored per block (`block_0`, ...), so
  checkpoints and initial values do not depend on `scan`. With `scan` the
  applied stack stacks them along a new leading axis and runs one block body
  in a `jax.lax.scan`: XLA compiles one block instead of `num_layers`, which
  shortens the compile (and the compilation cache's load) of every program
  that contains the stack; the outputs equal the unrolled loop's up to float
  summation order. Initialisation always runs the unrolled loop, so the
  initial parameters are the same either way.

  Attributes:
    num_layers: number of blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    dropout: MLP hidden dropout.
    drop_path: stochastic-depth rate (the same for every block).
    cross_attention: blocks cross-attend to the context.
    remat: per-block rematerialisation, one of `layers.REMAT_POLICIES`.
    scan: apply the blocks as one scanned body (see above).
    dtype: compute dtype.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  drop_path: float = 0.0
  cross_attention: bool = False
  remat: str = 'none'
  scan: bool = False
  dtype: jnp.dtype = jnp.float32

  def _block(self, name: str | None) -> nn.Module:
    block = layers.remat(TransformerBlock, self.remat, static_argnums=(3,))
    # `parent=None` makes the scanned body an unbound module that is applied
    # to one block's parameters at a time.
    kwargs = dict(name=name) if name else dict(parent=None)
    return block(self.num_heads, self.mlp_dim, self.dropout, self.drop_path,
                 cross_attention=self.cross_attention, dtype=self.dtype,
                 **kwargs)

  @nn.compact
  def __call__(self,
               x: jax.Array,
               context: jax.Array | None = None,
               *,
               train: bool) -> jax.Array:
    """Maps x: [b, t, d] (attending to context [b, s, d_c]) to [b, t, d]."""
    x = layers.constrain(x, layers.TOKENS)
    if self.scan and self.num_layers > 1 and not self.is_initializing():
      return self._scanned(x, context, train)
    for i in range(self.num_layers):
      x = self._block(f'block_{i}')(x, context, train)
      x = layers.constrain(x, layers.TOKENS)
    return x

  def _scanned(self, x: jax.Array, context: jax.Array | None,
               train: bool) -> jax.Array:
    """The blocks as one `lax.scan` body over their stacked parameters."""
    params = self.variables['params']
    names = [f'block_{i}' for i in range(self.num_layers)]
    missing = [n for n in names if n not in params]
    if missing:
      raise ValueError(
          f'TransformerStack {self.name!r}: parameters {missing} are missing '
          f'(found {sorted(params)}); the checkpoint does not match '
          f'num_layers={self.num_layers}.')
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           *[params[n] for n in names])
    uses_rng = train and (self.dropout > 0 or self.drop_path > 0)
    keys = (jax.random.split(self.make_rng('dropout'), self.num_layers)
            if uses_rng else None)
    body = self._block(None)

    def step(carry, layer):
      layer_params, key = layer
      rngs = {'dropout': key} if key is not None else {}
      y = body.apply({'params': layer_params}, carry, context, train,
                     rngs=rngs)
      return layers.constrain(y, layers.TOKENS), None

    x, _ = jax.lax.scan(step, x, (stacked, keys))
    return x


class TokenEncoder(nn.Module):
  """Transformer encoder over a feature map (the reference `ResNetTransformer`
  minus its ResNet).

  map → tokens → dropout → dense(dim) → LayerNorm → + 2-D sinusoidal
  positions → pre-norm self-attention blocks → LayerNorm.

  Attributes:
    dim: token width.
    num_layers: encoder blocks.
    mlp_dim: MLP hidden width.
    num_heads: attention heads.
    dropout: dropout on the input tokens and the MLP hidden units.
    drop_path: stochastic-depth rate of every residual branch.
    remat: per-block rematerialisation, one of `layers.REMAT_POLICIES`.
    scan: apply the blocks as one scanned body (`TransformerStack.scan`).
    dtype: compute dtype.
  """
  dim: int = 512
  num_layers: int = 12
  mlp_dim: int = 2048
  num_heads: int = 16
  dropout: float = 0.1
  drop_path: float = 0.1
  remat: str = 'none'
  scan: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, feature_map: jax.Array, *, train: bool) -> jax.Array:
    """Encodes feature_map: [b, h, w, c] into tokens [b, h*w, dim]."""
    b, h, w, c = feature_map.shape
    x = feature_map.reshape(b, h * w, c).astype(self.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = layers.dense(self.dim, ('mlp', 'embed'), dtype=self.dtype,
                     name='stem_projection')(x)
    x = layers.layer_norm(dtype=self.dtype, name='stem_ln')(x)
    x = x + sinusoidal_2d(h, w, self.dim).astype(self.dtype)
    x = TransformerStack(
        self.num_layers, self.num_heads, self.mlp_dim, self.dropout,
        self.drop_path, cross_attention=False, remat=self.remat,
        scan=self.scan, dtype=self.dtype, name='transformer')(x, train=train)
    x = layers.layer_norm(dtype=self.dtype, name='output_ln')(x)
    return layers.constrain(x, layers.TOKENS)
