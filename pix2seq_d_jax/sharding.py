"""Device mesh, logical-axis rules and the shardings of state and batches.

Three layers, as in maxtext and flax's lm1b: physical mesh axes from
`config.mesh` (`(axis, size)` pairs, -1 = the remaining devices), logical
names on weights (set where the weights are created with
`nn.with_logical_partitioning`) and on the main activations (set with
`nn.with_logical_constraint` in `models/`), and `config.sharding_rules`
mapping logical names to mesh axes. The batch's leading axis carries the
logical name `batch`, so the rule for `batch` decides the data-parallel
axes. Data parallel, FSDP and tensor parallel are rules (and mesh) changes.

A rule's mesh axes that the mesh does not have are dropped, so one rules
table serves several meshes (`("batch", ("data", "fsdp"))` is data
parallel on a `data` mesh); a rule none of whose axes is in the mesh is an
error, as it is most likely a typo or a rules table for another mesh.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pix2seq_d_jax import config_lib

PyTree = Any
Rules = Sequence[tuple[str, Any]]
# The logical name of every batch's leading axis (and of the activations').
BATCH = "batch"
# What `rules=None` means for the batch functions: the rule of the default
# config. Transitional, for callers that do not pass the config's rules yet.
DEFAULT_BATCH_RULE = (BATCH, ("data", "fsdp"))


def make_mesh(
    mesh_config: Sequence[tuple[str, int]],
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a mesh from `(axis, size)` pairs; one size may be -1.

  Axes use `AxisType.Auto`: jax 0.10 defaults to Explicit axes, which turn
  sharding constraints into asserts.

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


def mesh_rules(rules: Rules, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
  """The rules as they apply to `mesh`: absent mesh axes dropped.

  Args:
    rules: `config.sharding_rules`, `(logical name, mesh axes)` pairs in
      order of precedence; mesh axes are a name, a tuple of names or None
      (replicated).
    mesh: the device mesh.

  Returns:
    The rules with each mesh-axes entry reduced to the axes of `mesh` (a
    name, a tuple of two or more names, or None).

  Raises:
    config_lib.ConfigError: a malformed rule, no rule for `batch`, or a rule
      none of whose mesh axes is in the mesh.
  """
  where = f"config.sharding_rules={[tuple(r) for r in rules]}"
  out = []
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise config_lib.ConfigError(
          f"{where}: {rule!r} is not a (logical name, mesh axes) pair")
    name, axes = rule
    if axes is None:
      out.append((name, None))
      continue
    wanted = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = tuple(a for a in wanted if a in mesh.axis_names)
    if not kept:
      raise config_lib.ConfigError(
          f"{where}: the rule for {name!r} names mesh axes {wanted}, none "
          f"of which is in config.mesh (axes {tuple(mesh.axis_names)}); "
          "map it to None to replicate")
    out.append((name, kept[0] if len(kept) == 1 else kept))
  if BATCH not in [name for name, _ in out]:
    raise config_lib.ConfigError(
        f"{where} has no rule for {BATCH!r}, the logical name of every "
        "batch's leading axis; add e.g. ('batch', ('data', 'fsdp')) to "
        "config.sharding_rules")
  return tuple(out)


def batch_axes(mesh: Mesh, rules: Rules | None = None) -> tuple[str, ...]:
  """Mesh axes the batch's leading dimension is split over (its rule's).

  Args:
    mesh: the device mesh.
    rules: `config.sharding_rules`; None = `DEFAULT_BATCH_RULE` (its axes
      that the mesh has, none being an error only with explicit rules).

  Raises:
    config_lib.ConfigError: see `mesh_rules`.
  """
  if rules is None:
    return tuple(a for a in DEFAULT_BATCH_RULE[1] if a in mesh.axis_names)
  spec = nn.logical_to_mesh_axes((BATCH,), list(mesh_rules(rules, mesh)))
  axes = spec[0]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
  """Leading dimension over the `batch` rule's mesh axes, the rest replicated.

  Raises:
    config_lib.ConfigError: see `mesh_rules`.
  """
  axes = batch_axes(mesh, rules)
  return NamedSharding(mesh, PartitionSpec(axes) if axes else PartitionSpec())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules: Rules | None = None) -> int:
  """How many ways the batch is split (the `batch` rule's mesh axes).

  Raises:
    config_lib.ConfigError: see `mesh_rules`.
  """
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh, rules)]))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Context in which the models' activation constraints take effect.

  `nn.with_logical_constraint` reads the rules and the (abstract) mesh from
  the context when it is traced, and is a no-op without them. Both can be
  entered inside a jitted function, so the jitted step carries its layout
  wherever it is called or lowered.
  """
  with nn.logical_axis_rules(list(mesh_rules(rules, mesh))), \
      jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def with_activation_rules(
    fn: Callable[..., Any], mesh: Mesh, rules: Rules
) -> Callable[..., Any]:
  """`fn` traced under `activation_rules(mesh, rules)`; jit the result."""
  mesh_rules(rules, mesh)  # Fails here, not at the first trace.

  # functools.wraps keeps `fn`'s name, which names the jitted program
  # (`jit(train_step)`) in logs, profiles and compile counts.
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_rules(mesh, rules):
      return fn(*args, **kwargs)

  return wrapped


def state_shardings(
    abstract_boxed_state: PyTree,
    mesh: Mesh,
    rules: Rules,
) -> PyTree:
  """Shardings of every leaf of a boxed state, from its logical names.

  Unnamed leaves (step, optimizer counters) are replicated. The result has
  the structure of the unboxed state.

  Raises:
    config_lib.ConfigError: see `mesh_rules`.
  """
  specs = nn.get_partition_spec(abstract_boxed_state)
  return nn.logical_to_mesh_sharding(
      specs, mesh, list(mesh_rules(rules, mesh)))


def global_batch(
    local_batch: dict[str, np.ndarray], mesh: Mesh,
    rules: Rules | None = None,
) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global jax Arrays.

  On CPU devices it returns them ready: jax's CPU client runs a computation
  on the calling thread (`xla_env.run_cpu_computations_inline`) only if its
  inputs are ready, and right after it is made the copy of a batch often is
  not; the train step, the sampler or the predictor would then run on a
  worker thread, whose heap maps their temporaries anew. The copy is a
  host memcpy there, so waiting costs nothing worth overlapping.

  Raises:
    ValueError: naming the field whose leading dimension does not split
      evenly over the local devices.
    config_lib.ConfigError: see `mesh_rules`.
  """
  sharding = batch_sharding(mesh, rules)
  local_devices = max(
      1, data_parallel_size(mesh, rules) // jax.process_count())
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
  if all(d.platform == "cpu" for d in mesh.devices.flat):
    out = jax.block_until_ready(out)
  return out
