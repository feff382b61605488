"""Small building blocks shared by the Pix2Seq-D model modules.

Every weight of the model is created through the factories here, so that each
one carries logical axis names (`nn.with_logical_partitioning`) that the
sharding rules map to mesh axes, and so that parameters stay float32 while the
activations run in the configured compute dtype. The main activations get
logical names too (`constrain`), and blocks can recompute their activations
in the backward pass (`remat`). The group-count rule for GroupNorm and the
compute-dtype lookup live here too.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pix2seq_d_jax.models import accumulation, convolution
from pix2seq_d_jax.models import group_norm as group_norm_lib

Initializer = Any

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

CONV_KERNEL_AXES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')

# Logical names of the main activations; the weights' names where a weight
# axis produces the activation axis, so one rule shards both.
TOKENS = ('batch', 'length', 'embed')
MLP_HIDDEN = ('batch', 'length', 'mlp')
FEATURES = ('batch', 'height', 'width', 'conv_out')

# Per-block rematerialisation: `full` saves nothing inside a block (only its
# inputs), `dots` saves the matmul and conv outputs without batch dimensions
# (jax.checkpoint_policies.dots_with_no_batch_dims_saveable).
REMAT_POLICIES = ('none', 'full', 'dots')

# Keras' glorot-uniform default, used by the reference for dense layers.
DENSE_INIT = nn.initializers.xavier_uniform()


def fan_avg_uniform(scale: float = 1.0) -> Initializer:
  """Variance-scaling initialiser, fan-average, uniform distribution.

  This is the reference U-Net's initialiser. A tiny scale (1e-10) makes a
  layer start as (almost) zero, so a residual block begins as its shortcut and
  the output head begins at zero.

  Args:
    scale: variance scale; 1.0 is Glorot uniform, 1e-10 is near-zero.

  Returns:
    A jax initializer.
  """
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def get_dtype(name: str) -> jnp.dtype:
  """Returns the compute dtype named by a config string.

  Args:
    name: 'float32' or 'bfloat16'.

  Returns:
    The jnp dtype.

  Raises:
    ValueError: if the name is unknown.
  """
  if name not in DTYPES:
    raise ValueError(
        f'dtype={name!r} is not supported; expected one of {sorted(DTYPES)}.')
  return DTYPES[name]


def num_groups(channels: int, max_groups: int = 32) -> int:
  """GroupNorm group count: min(32, channels // 4), lowered until it divides.

  The reference uses min(channels // 4, 32); at paper scale every width is a
  multiple of 32. Tiny test models have widths like 24 or 8, so the count is
  lowered to the nearest divisor to keep GroupNorm well defined.

  Args:
    channels: number of channels normalised.
    max_groups: upper bound on the group count.

  Returns:
    A group count g >= 1 with channels % g == 0.
  """
  groups = max(1, min(max_groups, channels // 4))
  while channels % groups:
    groups -= 1
  return groups


def conv(features: int,
         kernel_size: int,
         *,
         strides: int = 1,
         padding: str | Sequence[tuple[int, int]] = 'SAME',
         use_bias: bool = True,
         kernel_init: Initializer = None,
         dtype: jnp.dtype = jnp.float32,
         conv_impl: str = 'lax',
         name: str | None = None) -> nn.Conv:
  """A 2-D convolution whose kernel and bias carry logical axis names.

  Args:
    features: output channels.
    kernel_size: square kernel size.
    strides: square stride.
    padding: flax padding ('SAME', 'VALID' or explicit pairs).
    use_bias: whether to add a bias.
    kernel_init: kernel initializer; Glorot uniform when None.
    dtype: compute dtype (parameters stay float32).
    conv_impl: 'lax' or 'tiled' (`convolution.conv_function`): the same
      convolution and parameters, computed with XLA:CPU-friendly shapes.
    name: module name.

  Returns:
    An `nn.Conv` (kernel axes conv_h, conv_w, conv_in, conv_out; bias axis
    conv_out).
  """
  kernel_init = fan_avg_uniform() if kernel_init is None else kernel_init
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=padding,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, CONV_KERNEL_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             ('conv_out',)),
      conv_general_dilated=convolution.conv_function(conv_impl),
      name=name)


def dense_initializers(axes: tuple[str, str],
                       kernel_init: Initializer = DENSE_INIT
                       ) -> tuple[Initializer, Initializer]:
  """`dense`'s kernel and bias initializers, with their logical axis names.

  For layers that hold a dense layer's parameters but compute with them
  differently (`transunet.ScaleShift`): the same names, shapes and initial
  values as `dense`.
  """
  return (nn.with_logical_partitioning(kernel_init, axes),
          nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def dense(features: int,
          axes: tuple[str, str],
          *,
          kernel_init: Initializer = DENSE_INIT,
          dtype: jnp.dtype = jnp.float32,
          name: str | None = None) -> nn.Dense:
  """A dense layer whose kernel and bias carry logical axis names.

  Args:
    features: output width.
    axes: logical names of the kernel's (input, output) axes; the bias takes
      the output name.
    kernel_init: kernel initializer.
    dtype: compute dtype (parameters stay float32).
    name: module name.

  Returns:
    An `nn.Dense`.
  """
  kernel_init, bias_init = dense_initializers(axes, kernel_init)
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      bias_init=bias_init,
      # bfloat16 products accumulate in float32 (native on CPU and
      # accelerators); float32 ones are plain `lax.dot_general`.
      dot_general=accumulation.dot_general,
      name=name)


def _norm_inits(scale_init: Initializer = nn.initializers.ones) -> dict:
  return dict(
      scale_init=nn.with_logical_partitioning(scale_init, ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             ('norm',)))


def group_norm(channels: int,
               *,
               zero_init: bool = False,
               dtype: jnp.dtype = jnp.float32,
               name: str | None = None) -> group_norm_lib.GroupNorm:
  """GroupNorm (epsilon 1e-5) with `num_groups(channels)` groups.

  The function of `nn.GroupNorm`, with parameters of the same names and
  shapes, but a hand-derived backward pass (`models/group_norm.py`).

  Args:
    channels: number of channels it will normalise.
    zero_init: start the scale at zero (last norm of a residual branch).
    dtype: compute dtype (statistics are reduced in float32).
    name: module name.

  Returns:
    A `GroupNorm` with scale/bias on the logical axis 'norm'.
  """
  scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
  return group_norm_lib.GroupNorm(
      num_groups=num_groups(channels),
      epsilon=1e-5,
      dtype=dtype,
      name=name,
      **_norm_inits(scale_init))


def layer_norm(*,
               dtype: jnp.dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
  """LayerNorm with epsilon 1e-6 (the reference transformer's value).

  Args:
    dtype: compute dtype.
    name: module name.

  Returns:
    An `nn.LayerNorm` with scale/bias on the logical axis 'norm'.
  """
  return nn.LayerNorm(
      epsilon=1e-6,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
      **_norm_inits())


def batch_norm(*,
               train: bool,
               momentum: float,
               zero_init: bool = False,
               dtype: jnp.dtype = jnp.float32,
               name: str | None = None) -> nn.BatchNorm:
  """BatchNorm (epsilon 1e-5) that keeps running averages in `batch_stats`.

  Under a jitted, data-sharded step the batch mean is taken over the global
  batch, which is the synchronised batch norm of the reference.

  Args:
    train: use batch statistics and update the running averages when True,
      use the running averages when False.
    momentum: running-average decay (0.9 in the reference).
    zero_init: start the scale at zero (last norm of a residual branch).
    dtype: compute dtype.
    name: module name.

  Returns:
    An `nn.BatchNorm`.
  """
  scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=momentum,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
      **_norm_inits(scale_init))


def constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
  """Hints the layout of an activation by logical axis names.

  A no-op unless logical axis rules and a mesh are in context when traced
  (`sharding.activation_rules`, entered by the experiment's train step), so
  the modules run unchanged anywhere else. A dimension its mesh axes do not
  divide (a micro-batch smaller than the data axes, an odd width) is left
  to the compiler rather than rejected.

  Args:
    x: the activation, one logical name per dimension.
    names: logical axis names, e.g. `TOKENS` or `FEATURES`.

  Returns:
    x, with a sharding constraint when rules and a mesh are set.
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  spec = nn.logical_to_mesh_axes(names, rules)
  fitted = []
  for name, size, axes in zip(names, x.shape, spec, strict=True):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([mesh.shape[a] for a in axes]))
    fitted.append(name if size % ways == 0
                  else jax.sharding.PartitionSpec.UNCONSTRAINED)
  return nn.with_logical_constraint(x, tuple(fitted))


def remat(cls: type[nn.Module], policy: str,
          static_argnums: tuple[int, ...]) -> type[nn.Module]:
  """A block class that recomputes its activations in the backward pass.

  The parameters keep their names and shapes, so checkpoints do not depend
  on the policy.

  Args:
    cls: the block's module class.
    policy: one of `REMAT_POLICIES`; 'none' returns `cls` itself.
    static_argnums: positions of the non-array call arguments (the `train`
      flag), counting `self` as 0.

  Returns:
    `cls` or its `nn.remat` version.

  Raises:
    ValueError: on an unknown policy.
  """
  if policy == 'none':
    return cls
  if policy == 'full':
    return nn.remat(cls, static_argnums=static_argnums)
  if policy == 'dots':
    return nn.remat(
        cls, static_argnums=static_argnums,
        policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f'remat policy {policy!r}; expected one of '
                   f'{REMAT_POLICIES}.')
