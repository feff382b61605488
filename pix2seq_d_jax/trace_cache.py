"""The lowered train step, kept across processes with `jax.export`.

With jax's persistent compilation cache a restarted run reads the compiled
train step back instead of compiling it, but jax first traces the Python
step and lowers it to StableHLO, because that cache's key is computed from
the lowered program: 6–8 s of a warm start of the paper model on a 2-core
CPU. `lower_step` keeps the lowered step itself, serialised by
`jax.export`, in a folder beside the compiled programs, under a key of
everything the trace depends on (`trace_key`):

- this package's source (every `.py` file's path and bytes);
- the versions of jax, jaxlib, flax, optax and numpy;
- the run's whole config and anything else the caller passes (the
  schedule's lengths);
- the mesh (axis names and sizes, device kinds, process count) and the
  arguments' shapes, dtypes and shardings;
- jax's configuration values, `XLA_FLAGS` and the backend.

A hit reads the step back (about 0.1 s for the paper model's 2.2 MB) and
lowers a jitted call of it (under 1 s); its compile is a compilation-cache
hit as before. A miss traces the step once through `jax.export`, writes it
for the next process (process 0 only, atomically) and lowers the same call,
so a cold and a warm process compile the same program; that costs a miss
about 2 s more than a plain lowering (7.5–8.7 against 5.7–6.1 s alone).
An entry that cannot be read or does not fit the arguments is a miss
(logged) and is overwritten. What the key cannot see is code changed at
run time (a monkeypatched function, a dependency edited in place under
the same version): such runs turn the cache off
(`config.trace_cache=False`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging
from etils import epath

from pix2seq_d_jax.formats import atomic

PyTree = Any
# The distributions whose code the trace runs (besides this package's).
TRACED_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "numpy")
SUFFIX = ".jax_exported"


PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent


@functools.cache
def source_digest() -> str:
  """`tree_digest` of this package (read once per process)."""
  return tree_digest(PACKAGE_ROOT)


def tree_digest(root: pathlib.Path) -> str:
  """SHA-256 of the `.py` files under `root` (relative paths and bytes)."""
  h = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    h.update(path.relative_to(root).as_posix().encode())
    h.update(b"\0")
    h.update(path.read_bytes())
    h.update(b"\0")
  return h.hexdigest()


def _version(distribution: str) -> str:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def trace_key(config_json: str, extra: dict[str, Any], mesh: Any,
              args: PyTree) -> str:
  """The cache key of tracing a function of `args` for this run.

  Args:
    config_json: the run's whole config as JSON.
    extra: anything else the traced function was built from (JSON-able).
    mesh: the `jax.sharding.Mesh` the step runs on.
    args: the abstract arguments (`jax.ShapeDtypeStruct`s with shardings).

  Returns:
    A hex SHA-256 over the parts listed in the module docstring.
  """
  leaves, tree = jax.tree.flatten(args)
  parts = {
      "source": source_digest(),
      "versions": {d: _version(d) for d in TRACED_DISTRIBUTIONS},
      "config": config_json,
      "extra": extra,
      "mesh": {
          "axes": [str(a) for a in mesh.axis_names],
          "shape": list(mesh.devices.shape),
          "devices": sorted({d.device_kind for d in mesh.devices.flat}),
          "processes": jax.process_count(),
      },
      "args": {
          "tree": str(tree),
          "leaves": [[list(x.shape), str(x.dtype),
                      str(getattr(x, "sharding", None))] for x in leaves],
      },
      "jax_config": sorted((k, repr(v)) for k, v in jax.config.values.items()),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "backend": jax.default_backend(),
  }
  text = json.dumps(parts, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()


class TreeCompiled:
  """A compiled flat step called with and returning the step's pytrees.

  `compiled(state, *rest) -> (state, metrics)`, as a compiled jitted step;
  `as_text`, `memory_analysis` and `cost_analysis` are the program's.
  """

  def __init__(self, compiled: Any, in_tree: Any, state_tree: Any,
               metric_names: Sequence[str]):
    self._compiled = compiled
    self._in_tree = in_tree
    self._state_tree = state_tree
    self._metric_names = tuple(metric_names)

  def __call__(self, *args: Any) -> tuple[PyTree, dict[str, jax.Array]]:
    leaves, tree = jax.tree.flatten(args)
    if tree != self._in_tree:
      raise TypeError(f"the step was compiled for arguments {self._in_tree}, "
                      f"got {tree}")
    state_leaves, metrics = self._compiled(*leaves)
    return (jax.tree.unflatten(self._state_tree, state_leaves),
            dict(zip(self._metric_names, metrics, strict=True)))

  def as_text(self) -> str:
    return self._compiled.as_text()

  @property
  def out_info(self) -> tuple[PyTree, dict[str, jax.ShapeDtypeStruct]]:
    """The outputs' shapes, dtypes and shardings, as `(state, metrics)`."""
    state_info, metrics_info = self._compiled.out_info
    return (jax.tree.unflatten(self._state_tree, state_info),
            dict(zip(self._metric_names, metrics_info, strict=True)))

  def memory_analysis(self) -> Any:
    return self._compiled.memory_analysis()

  def cost_analysis(self) -> Any:
    return self._compiled.cost_analysis()


class TreeLowered:
  """The lowered call of a cached step; `compile()` gives `TreeCompiled`."""

  def __init__(self, lowered: Any, in_tree: Any, state_tree: Any,
               metric_names: Sequence[str], hit: bool):
    self._lowered = lowered
    self._in_tree = in_tree
    self._state_tree = state_tree
    self.metric_names = tuple(metric_names)
    # Whether the step was read from the cache (False: traced and written).
    self.hit = hit

  def as_text(self) -> str:
    return self._lowered.as_text()

  def cost_analysis(self) -> Any:
    return self._lowered.cost_analysis()

  def compile(self) -> TreeCompiled:
    return TreeCompiled(self._lowered.compile(), self._in_tree,
                        self._state_tree, self.metric_names)


def _read(path: epath.Path, leaves: Sequence[Any], num_state: int
          ) -> tuple[Any, list[str]] | None:
  """(exported, metric names) of a cache entry that fits, else None."""
  if not path.exists():
    return None
  try:
    header, blob = path.read_bytes().split(b"\n", 1)
    names = json.loads(header)["metrics"]
    exported = jax.export.deserialize(bytearray(blob))
  except Exception as e:  # noqa: BLE001 - any unreadable entry is a miss.
    logging.warning("Trace cache entry %s is unreadable (%s: %s); tracing "
                    "the step again.", path, type(e).__name__, e)
    return None
  expected = [(tuple(x.shape), x.dtype) for x in leaves]
  found = [(tuple(a.shape), a.dtype) for a in exported.in_avals]
  if found != expected or len(exported.out_avals) != num_state + len(names):
    logging.warning("Trace cache entry %s does not fit the step's arguments; "
                    "tracing the step again.", path)
    return None
  return exported, names


def lower_step(step_fn: Callable[..., tuple[PyTree, dict[str, Any]]],
               args: Sequence[PyTree], *, in_shardings: Sequence[PyTree],
               metrics_sharding: Any, directory: str, key: str
               ) -> TreeLowered:
  """The step lowered from the cache entry `key`, traced on a miss.

  Args:
    step_fn: `(state, *rest) -> (state, metrics)`; the output state has the
      input state's structure, metrics is a dict of arrays.
    args: abstract `(state, *rest)`.
    in_shardings: the shardings of `args` (same structure).
    metrics_sharding: the sharding of every metric.
    directory: the cache folder (a local path or a URL).
    key: `trace_key` of this step.

  Returns:
    The lowered step; the state (`args[0]`) is donated.

  Raises:
    ValueError: the step's output state has another structure than its
      input state.
  """
  leaves, in_tree = jax.tree.flatten(tuple(args))
  flat_shardings = tuple(jax.tree.leaves(
      tuple(in_shardings),
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))
  if len(flat_shardings) != len(leaves):
    raise ValueError(f"{len(flat_shardings)} shardings for {len(leaves)} "
                     "arguments")
  state_tree = jax.tree.structure(args[0])
  num_state = state_tree.num_leaves
  out_shardings = (flat_shardings[:num_state], metrics_sharding)
  donated = tuple(range(num_state))
  path = epath.Path(directory) / f"{key}{SUFFIX}"

  t0 = time.perf_counter()
  entry = _read(path, leaves, num_state)
  if entry is None:
    exported, names = _export(step_fn, leaves, in_tree, state_tree,
                              flat_shardings, out_shardings, donated)
    blob = exported.serialize()
    # Read back, as a warm start does: the exported object keeps the
    # step's trace alive (for its VJP), a few hundred MB for the process's
    # lifetime, which the serialised module does not.
    exported = jax.export.deserialize(blob)
    if jax.process_index() == 0:
      header = json.dumps({"metrics": names}).encode()
      atomic.write_bytes(path, header + b"\n" + bytes(blob))
    logging.info("Traced the train step in %.1f s; kept it in %s.",
                 time.perf_counter() - t0, path)
  else:
    exported, names = entry
    logging.info("Read the traced train step from %s in %.1f s.", path,
                 time.perf_counter() - t0)

  # Named as the step, which names the program in logs and profiles.
  def train_step(*flat):
    return exported.call(*flat)

  call = jax.jit(train_step, in_shardings=flat_shardings,
                 out_shardings=out_shardings, donate_argnums=donated)
  return TreeLowered(call.lower(*leaves), in_tree, state_tree, names,
                     hit=entry is not None)


def _export(step_fn, leaves, in_tree, state_tree, flat_shardings,
            out_shardings, donated):
  """`jax.export` of the step over flat arguments; (exported, names)."""
  names: list[str] = []

  def train_step(*flat):
    state, metrics = step_fn(*jax.tree.unflatten(in_tree, flat))
    state_leaves, tree = jax.tree.flatten(state)
    if tree != state_tree:
      raise ValueError(f"the step returns a state of structure {tree}, not "
                       f"its input's {state_tree}")
    names[:] = sorted(metrics)
    return tuple(state_leaves), tuple(metrics[n] for n in names)

  jitted = jax.jit(train_step, in_shardings=flat_shardings,
                   out_shardings=out_shardings, donate_argnums=donated)
  exported = jax.export.export(jitted)(*leaves)
  return exported, list(names)
