"""Global-norm gradient clipping shaped for a short compile and one pass.

`optax.clip_by_global_norm` computes the same thing; this version differs
only in how XLA lowers it, which matters for a model with hundreds of
parameter arrays (the paper model has 679, 439 of them biases and norm
scales):

- The norm sums the squares of every small leaf (`SMALL_LEAF_SIZE`
  elements or fewer) in one reduction over their concatenation, instead of
  one reduction kernel per leaf. XLA:CPU compiles a kernel per fusion, so
  per-leaf reductions cost compile time for work that takes microseconds.
- Clipping multiplies each gradient by one scalar, `min(1, max_norm /
  norm)`, where optax divides every element by the norm. XLA does not copy
  a division into several consumers, so optax's clipped gradient is written
  out once per leaf and read back by Adam's two moment updates; a multiply
  by a scalar is fused into both instead (one pass over the gradients
  less per step).

In the paper model's train step (256 / 128, batch 2) the two take XLA:CPU's
loop fusions from 7,964 to 7,377 (the multiply) and then to 6,049 (the
norm); docs/speed.md has the compile and step times. Updates whose norm is
below `max_norm` come out unchanged, as in optax; clipped ones equal
optax's to float rounding (a multiply by `max_norm / norm` against a
division and a multiply), and the norm itself to summation order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
# Leaves of at most this many elements are reduced together: all biases and
# norm scales, small kernels; 678,000 of the paper model's 94.5M parameters.
SMALL_LEAF_SIZE = 65_536


def global_norm(tree: PyTree, *, small_leaf_size: int = SMALL_LEAF_SIZE
                ) -> jax.Array:
  """The L2 norm of all leaves of `tree` together, as a float32 scalar.

  Leaves of at most `small_leaf_size` elements are concatenated (in
  float32) and reduced once; larger leaves are reduced one by one, so no
  large array is copied. An empty tree has norm 0.
  """
  leaves = jax.tree.leaves(tree)
  small = [jnp.ravel(x).astype(jnp.float32) for x in leaves
           if x.size <= small_leaf_size]
  squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves
             if x.size > small_leaf_size]
  if small:
    squares.append(jnp.sum(jnp.square(jnp.concatenate(small))))
  return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales updates to a global norm of at most `max_norm`.

  The same rule as `optax.clip_by_global_norm`: updates whose global norm
  is below `max_norm` pass unchanged; otherwise all are scaled by
  `max_norm / norm`. A non-finite norm makes the updates non-finite, as in
  optax, so that a step that skips non-finite updates still sees them.

  Raises:
    ValueError: `max_norm` is not positive.
  """
  if not max_norm > 0:
    raise ValueError(f"grad_clip_norm={max_norm!r}: expected > 0 "
                     "(0 or less turns clipping off in make_optimizer)")

  def scale_to_max_norm(updates: PyTree, params: PyTree | None) -> PyTree:
    del params
    norm = global_norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)

  return optax.stateless(scale_to_max_norm)
