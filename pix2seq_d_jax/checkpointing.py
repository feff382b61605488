"""Checkpoints: orbax manager, what a checkpoint holds, and the resume order.

A checkpoint at step N holds two items: `state` (the TrainState, saved with
`StandardSave` so shardings are kept and a checkpoint written on N devices
restores on M) and `data` (the input iterator's state as JSON, so a resumed
run sees exactly the batches an uninterrupted run would have seen).

Protocol (why a crash never damages the last good checkpoint): orbax writes
each step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only
once every item is complete; restore looks at finalized steps only, and
`cleanup_tmp_directories` removes leftovers of a killed save on the next
start. Saves are asynchronous; `wait_until_finished()` runs before exit.

Resume order: this workdir's latest checkpoint, then `config.resume` (another
workdir or checkpoint step folder, full state), then `config.model_init`
(weights only), then scratch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any
STATE = "state"
DATA = "data"


def make_manager(
    workdir: str, *, keep: int, keep_period: int | None = None
) -> ocp.CheckpointManager:
  """An async CheckpointManager under `<workdir>/checkpoints`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      keep_period=keep_period,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,
      create=True,
  )
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=options,
      item_names=(STATE, DATA),
  )


def _encode_data_state(data_state: Any) -> dict:
  # grain's DataLoader iterator state is bytes (JSON inside); keep it as
  # text so the checkpoint stays human-readable.
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, bytes):
    return {"kind": "bytes", "value": data_state.decode("utf-8")}
  return {"kind": "json", "value": json.loads(json.dumps(data_state))}


def _decode_data_state(payload: dict) -> Any:
  kind = payload.get("kind")
  if kind == "bytes":
    return payload["value"].encode("utf-8")
  if kind == "json":
    return payload["value"]
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


def restore_weights(path: str, abstract_state: PyTree) -> PyTree:
  """Restores the full state from another run's checkpoint folder.

  `path` is a workdir (its latest checkpoint is used), its `checkpoints`
  folder, or one step folder.

  Raises:
    FileNotFoundError: naming the path when no finalized checkpoint is there.
  """
  path = os.path.abspath(os.path.expanduser(path))
  candidates = [os.path.join(path, "checkpoints"), path]
  for directory in candidates:
    if not os.path.isdir(directory):
      continue
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_names=(STATE, DATA),
    )
    step = manager.latest_step()
    if step is not None:
      state, _ = restore(manager, step, abstract_state)
      manager.close()
      logging.info("Restored weights from %s step %d", directory, step)
      return state
    manager.close()
  parent, name = os.path.split(path)
  if name.isdigit() and os.path.isdir(parent):
    manager = ocp.CheckpointManager(
        parent,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_names=(STATE, DATA),
    )
    state, _ = restore(manager, int(name), abstract_state)
    manager.close()
    return state
  raise FileNotFoundError(
      f"no finalized checkpoint under {path!r} (expected a workdir, its "
      "checkpoints/ folder, or a step folder)"
  )


def abstract_with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """Attaches shardings to `jax.eval_shape` output for restoring."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      shardings,
  )
