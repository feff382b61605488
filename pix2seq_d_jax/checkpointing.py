"""Checkpoints: orbax manager, what a checkpoint holds, and the resume order.

A checkpoint at step N holds two items: `state` (the TrainState, saved with
`StandardSave` so shardings are kept and a checkpoint written on N devices
restores on M) and `data` (the input iterator's state of every process as
JSON, so each resumed process sees exactly the batches of its shard that an
uninterrupted run would have seen).

Protocol (why a crash never damages the last good checkpoint): orbax writes
each step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only
once every item is complete; restore looks at finalized steps only, and
`cleanup_tmp_directories` removes leftovers of a killed save on the next
start. Saves are asynchronous; `wait_until_finished()` runs before exit.

Resume order: this workdir's latest checkpoint, then `config.resume` (another
workdir or checkpoint step folder, full state), then `config.model_init`
(weights only), then scratch.

The iterator state is saved as JSON by hand rather than with grain's own
`grain.python.PyGrainCheckpointSave/Restore`, because grain's restore needs
the live iterator (it calls `set_state` and starts prefetching) while the
trainer restores the checkpoint before the input pipeline exists and builds
the pipeline from the restored state.

Restoring into a differently shaped target (another model config) is caught
before orbax reads any array: the abstract target is compared with the
checkpoint's stored tree metadata, and `CheckpointMismatchError` names the
first differing parameter path, both shapes and the checkpoint's
`config.json`.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from pix2seq_d_jax import config_lib
from pix2seq_d_jax.formats import paths

PyTree = Any
STATE = "state"
DATA = "data"


class CheckpointMismatchError(config_lib.ConfigError):
  """A checkpoint's parameters do not fit the config's model."""


def make_manager(
    workdir: str, *, keep: int, keep_period: int | None = None,
    save_concurrent_bytes: int | None = None,
) -> ocp.CheckpointManager:
  """An async CheckpointManager under `<workdir>/checkpoints`.

  `workdir` may be a bucket URL: orbax writes through `etils.epath` and
  tensorstore, and on object stores it marks a finished step with
  `commit_success.txt` instead of renaming a temporary folder.

  `save_concurrent_bytes` caps the state's bytes being written at once
  (orbax's default: 96 GB, i.e. all of it); it must exceed the largest
  array, which orbax writes in one piece (`write_cap_bytes`). On a CPU,
  orbax reads the arrays in place and tensorstore references them, so the
  write's own host memory is mostly its encoded chunks, about the bytes in
  flight: on one CPU, a 1.5 GiB state raised the resident size by
  1.2-1.3 GiB uncapped, 0.86-1.0 GiB at 1 GB and 0.17-0.25 GiB at 100 MB,
  each write taking 1.7-5.8 s in all three. The format on disk is the same.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      keep_period=keep_period,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,
      create=True,
  )
  if save_concurrent_bytes is None:
    items = {"item_names": (STATE, DATA)}
  else:
    if save_concurrent_bytes <= 0:
      raise ValueError(f"save_concurrent_bytes={save_concurrent_bytes}: "
                       "expected a positive number of bytes")
    items = {"item_handlers": {
        # Orbax's unit is GB (10**9 bytes), which it multiplies back out.
        STATE: ocp.StandardCheckpointHandler(
            save_concurrent_gb=save_concurrent_bytes / 10**9),
        DATA: ocp.JsonCheckpointHandler(),
    }}
  return ocp.CheckpointManager(
      paths.to_epath(workdir) / "checkpoints", options=options, **items)


def write_cap_bytes(abstract_state: PyTree, *,
                    floor_bytes: int = 100 * 10**6) -> int:
  """A cap on bytes written at once that every array of the state fits.

  Orbax refuses to write an array whose bytes reach the cap, so the cap is
  `floor_bytes` or twice the largest array, whichever is larger.
  """
  largest = max((leaf.size * np.dtype(leaf.dtype).itemsize
                 for leaf in jax.tree.leaves(abstract_state)
                 if hasattr(leaf, "dtype")), default=0)
  return max(floor_bytes, 2 * largest)


def _encode_data_state(data_state: Any) -> dict:
  # grain's DataLoader iterator state is bytes (JSON inside); keep it as
  # text so the checkpoint stays human-readable.
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, bytes):
    return {"kind": "bytes", "value": data_state.decode("utf-8")}
  if isinstance(data_state, list):
    # One state per process (process order): each host reads its own shard,
    # so each resumes from its own position.
    return {"kind": "per_process",
            "value": [_encode_data_state(s) for s in data_state]}
  return {"kind": "json", "value": json.loads(json.dumps(data_state))}


def _decode_data_state(payload: dict) -> Any:
  kind = payload.get("kind")
  if kind == "bytes":
    return payload["value"].encode("utf-8")
  if kind == "json":
    return payload["value"]
  if kind == "per_process":
    return [_decode_data_state(p) for p in payload["value"]]
  return None


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: PyTree,
    data_state: Any = None,
    *,
    force: bool = False,
) -> bool:
  """Saves state and iterator state at `step` (asynchronously)."""
  saved = manager.save(
      step,
      args=ocp.args.Composite(
          **{
              STATE: ocp.args.StandardSave(state),
              DATA: ocp.args.JsonSave(_encode_data_state(data_state)),
          }
      ),
      force=force,
  )
  if saved:
    logging.info("Saving checkpoint at step %d", step)
  return saved


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: PyTree,
) -> tuple[PyTree, Any]:
  """Restores `(state, data_state)` at `step` into the given shardings.

  Args:
    manager: the manager of the checkpoint folder.
    step: a finalized step.
    abstract_state: `jax.ShapeDtypeStruct`s with `.sharding` set (from
      `jax.eval_shape` plus the target shardings): the restored arrays take
      these shardings, whatever the device count at save time.
  """
  check_compatible(manager, step, abstract_state)
  restored = manager.restore(
      step,
      args=ocp.args.Composite(
          **{
              STATE: ocp.args.StandardRestore(abstract_state),
              DATA: ocp.args.JsonRestore(),
          }
      ),
  )
  return restored[STATE], _decode_data_state(restored[DATA] or {})


def _read_only_manager(directory: epath.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_names=(STATE, DATA),
  )


def _locate(path: str) -> tuple[epath.Path, int]:
  """(checkpoints folder, step) of a workdir, checkpoints or step folder.

  Raises:
    FileNotFoundError: naming the path when no finalized checkpoint is there.
  """
  root = epath.Path(paths.absolute(path))
  for directory in (root / "checkpoints", root):
    if not directory.is_dir():
      continue
    manager = _read_only_manager(directory)
    try:
      step = manager.latest_step()
    finally:
      manager.close()
    if step is not None:
      return directory, step
  if root.name.isdigit() and root.parent.is_dir():
    return root.parent, int(root.name)
  raise _not_a_checkpoint(str(root))


def restore_weights(path: str, abstract_state: PyTree) -> PyTree:
  """Restores the full state from another run's checkpoint folder.

  `path` (local or a bucket URL) is a workdir (its latest checkpoint is
  used), its `checkpoints` folder, or one step folder.

  Raises:
    FileNotFoundError: naming the path when no finalized checkpoint is there.
  """
  directory, step = _locate(path)
  manager = _read_only_manager(directory)
  try:
    state, _ = restore(manager, step, abstract_state)
  finally:
    manager.close()
  logging.info("Restored weights from %s step %d", directory, step)
  return state


def restore_subtree(path: str, abstract_state: PyTree,
                    fields: tuple[str, ...]) -> dict[str, PyTree]:
  """Reads only `fields` of a checkpointed state (e.g. the EMA weights).

  The other fields (optimizer state, raw parameters) are never read, so a
  predictor's peak memory is that of the weights it uses. The checkpoint
  is first checked against the whole `abstract_state` (metadata only).

  Args:
    path: as for `restore_weights`.
    abstract_state: the full restore target, with shardings.
    fields: top-level fields of the state to read, e.g.
      `("ema_params", "batch_stats")`.

  Returns:
    {field: restored tree} in the target's shardings.
  """
  directory, step = _locate(path)
  _check_compatible_at(directory, step, abstract_state)
  target = {name: getattr(abstract_state, name) for name in fields}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  step_dir = ocp.step.build_step_path(
      directory, ocp.step.standard_name_format(), step) / STATE
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
        step_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
  logging.info("Restored %s from %s step %d", ", ".join(fields), directory,
               step)
  return dict(restored)


_EXPECTED = "expected a workdir, its checkpoints/ folder or a step folder"


def _not_a_checkpoint(path: str) -> Exception:
  """Why `path` holds no checkpoint (files are explained by the caller)."""
  file = epath.Path(path)
  if not file.exists():
    return FileNotFoundError(f"{path!r} does not exist ({_EXPECTED})")
  if file.is_file():
    return FileNotFoundError(f"{path!r} is a file, not a checkpoint "
                             f"({_EXPECTED})")
  return FileNotFoundError(
      f"no finalized checkpoint under {path!r} ({_EXPECTED})"
  )


def _path_str(path: tuple[Any, ...]) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...] | None]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      _path_str(p): tuple(leaf.shape) if hasattr(leaf, "shape") else None
      for p, leaf in leaves
  }


def check_compatible(
    manager: ocp.CheckpointManager, step: int, abstract_state: PyTree
) -> None:
  """Fails in one line if the checkpoint's arrays do not fit the target.

  Compares the target's tree paths and shapes with the checkpoint's stored
  metadata (no array is read). orbax's own error on a mismatch names no
  parameter and advises `strict=False`, which would load a wrong model.

  Args:
    manager: the manager of the checkpoint folder.
    step: a finalized step.
    abstract_state: the restore target (`jax.ShapeDtypeStruct` leaves).

  Raises:
    CheckpointMismatchError: naming the first differing parameter path, both
      shapes, and the checkpoint's `config.json`.
  """
  _check_compatible_at(manager.directory, step, abstract_state)


def _check_compatible_at(directory: epath.Path, step: int,
                         abstract_state: PyTree) -> None:
  """`check_compatible` for the checkpoints folder `directory`."""
  try:
    # Read with a handler of our own: `manager.item_metadata` of a manager
    # built with item names only (a fresh resume) has no handler yet, and
    # warns for each item.
    metadata = ocp.StandardCheckpointHandler().metadata(
        ocp.step.build_step_path(
            directory, ocp.step.standard_name_format(), step
        ) / STATE
    )
    stored = _shapes(getattr(metadata, "tree", metadata))
  except Exception as e:  # Metadata missing or unreadable: orbax decides.
    logging.info("No tree metadata for step %d (%s); not compared.", step, e)
    return
  if not stored:
    return
  target = _shapes(abstract_state)
  problem = None
  for path, shape in target.items():
    if path not in stored:
      problem = f"{path} {shape} is in the config's model but not in it"
    elif stored[path] != shape:
      problem = (
          f"{path} has shape {stored[path]} in the checkpoint but {shape} "
          "in this config"
      )
    if problem:
      break
  else:
    extra = [p for p in stored if p not in target]
    if extra:
      problem = f"{extra[0]} {stored[extra[0]]} is in it but not in the model"
  if problem:
    directory = epath.Path(directory)
    workdir = (
        directory.parent if directory.name == "checkpoints" else directory
    )
    raise CheckpointMismatchError(
        f"checkpoint {directory}/{step} was written with another model "
        f"config: {problem}; use the config it was trained with (see "
        f"{workdir / 'config.json'}) or another workdir"
    )


def abstract_with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """Attaches shardings to `jax.eval_shape` output for restoring."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      shardings,
  )
