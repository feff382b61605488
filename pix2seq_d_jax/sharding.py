"""Device mesh, logical-axis rules and the shardings of state and batches.

Three layers, as in maxtext and flax's lm1b: physical mesh axes from
`config.mesh` (`(axis, size)` pairs, -1 = the remaining devices), logical
names on weights (set where the weights are created with
`nn.with_logical_partitioning`), and `config.sharding_rules` mapping logical
names to mesh axes. Data parallel is the default; FSDP is a rules change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    mesh_config: Sequence[tuple[str, int]],
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a mesh from `(axis, size)` pairs; one size may be -1.

  Axes use `AxisType.Auto`: jax 0.10 defaults to Explicit axes, which turn
  sharding constraints into asserts (STACK.md pitfall 1).

  Raises:
    ValueError: if sizes do not multiply to the device count.
  """
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(str(a) for a, _ in mesh_config)
  sizes = [int(s) for _, s in mesh_config]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={list(mesh_config)}: at most one size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"config.mesh={list(mesh_config)}: {len(devices)} devices are not "
          f"divisible by {known}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f"config.mesh={list(mesh_config)}: sizes multiply to "
        f"{int(np.prod(sizes))}, but there are {len(devices)} devices"
    )
  return jax.make_mesh(
      tuple(sizes),
      names,
      axis_types=(jax.sharding.AxisType.Auto,) * len(names),
      devices=devices,
  )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes the batch's leading dimension is split over."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading dimension over the data axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def state_shardings(
    abstract_boxed_state: PyTree,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
) -> PyTree:
  """Shardings of every leaf of a boxed state, from its logical names.

  Unnamed leaves (step, optimizer counters) are replicated. The result has
  the structure of the unboxed state.
  """
  specs = nn.get_partition_spec(abstract_boxed_state)
  return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def global_batch(
    local_batch: dict[str, np.ndarray], mesh: Mesh
) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global jax Arrays.

  Raises:
    ValueError: naming the field whose leading dimension does not split
      evenly over the local devices.
  """
  sharding = batch_sharding(mesh)
  local_devices = max(1, data_parallel_size(mesh) // jax.process_count())
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % local_devices:
      raise ValueError(
          f"batch field {key!r} has shape {value.shape}; its leading "
          f"dimension must be divisible by the {local_devices} local data "
          "shards"
      )
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
