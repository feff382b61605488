"""Batches whose device copy is still running when they are returned."""

import jax
import jax.numpy as jnp


@jax.jit
def late(x: jax.Array) -> jax.Array:
  """`x` after some 50 ms of work: dispatched asynchronously, not ready."""
  y = jnp.full((512, 512), 1.0) + 0 * x.sum()
  for _ in range(20):
    y = jnp.tanh(y @ y / 512.0)
  return x + (0 * y[0, 0]).astype(x.dtype)


def make_transfers_late(monkeypatch) -> list[jax.Array]:
  """Makes `jax.make_array_from_process_local_data` return late arrays.

  Returns the list of arrays it made, in order.
  """
  real_transfer = jax.make_array_from_process_local_data
  made = []

  def transfer(sharding, value):
    made.append(late(real_transfer(sharding, value)))
    return made[-1]

  monkeypatch.setattr(jax, "make_array_from_process_local_data", transfer)
  return made
