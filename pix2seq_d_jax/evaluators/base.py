"""What every in-training evaluator is built from.

`from_config` constructs each evaluator with the same keyword arguments;
`Evaluator` stores them and checks that the eval batch splits evenly over
the data-parallel devices and the processes, so subclasses only add their
own setup and `run(params, batch_stats, *, step) -> dict of metrics`.
`local_rows` brings this process's rows of a sharded prediction to host;
`gather_records` brings every process's per-example results to every
process, in example order, so metrics and files equal a 1-process run's.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from pix2seq_d_jax import sharding


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order.

  Args:
    x: [global_batch, ...] array sharded over its leading axis.

  Returns:
    [local_batch, ...] numpy rows held by this process's devices, each row
    once even when the array is replicated over a non-batch mesh axis.
  """
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = sorted(
      x.addressable_shards, key=lambda s: s.index[0].start or 0
  )
  rows, seen = [], set()
  for s in shards:
    key = s.index[0].start
    if key in seen:  # Replicated over a non-batch axis.
      continue
    seen.add(key)
    rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def _allgather(x: np.ndarray) -> np.ndarray:
  """[num_processes, ...] stack of every process's `x` (same shape)."""
  # process_allgather returns host numpy, so the collective has completed
  # before the next one is queued (CPU collectives deadlock otherwise).
  return np.asarray(multihost_utils.process_allgather(x))


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every process's JSON-serialisable records, sorted by their `index`.

  Records of variable size (segment lists, per-object rows) travel as UTF-8
  JSON bytes padded to the longest process's; JSON round-trips Python floats
  exactly. Every process must call this the same number of times.

  Args:
    records: this process's records, each with an int `index` (the example's
      position in evaluation order, unique over processes).

  Returns:
    All processes' records sorted by `index`.

  Raises:
    ValueError: if two records share an index (an example evaluated twice).
  """
  # One process too goes through JSON, so both paths see the same values.
  data = np.frombuffer(json.dumps(records).encode("utf-8"), np.uint8)
  if jax.process_count() > 1:
    sizes = _allgather(np.array([len(data)], np.int64)).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = data
    everyone = _allgather(padded)
  else:
    sizes, everyone = [len(data)], data[None]
  records = sorted(
      (r for p, size in enumerate(sizes)
       for r in json.loads(everyone[p, :size].tobytes())),
      key=lambda r: r["index"])
  indices = [r["index"] for r in records]
  if len(set(indices)) != len(indices):
    raise ValueError(f"examples evaluated more than once: {indices}")
  return records


class Evaluator(abc.ABC):
  """Holds the shared inputs of an evaluator (see the module docstring)."""

  def __init__(
      self,
      *,
      name: str,
      config: Any,
      predict_fn: Callable[..., Any],
      source: Any,
      preprocess_fn: Callable[[dict], dict],
      mesh: jax.sharding.Mesh,
      seed: int,
      workdir: str,
      rules: Any = None,
  ):
    """Stores the arguments.

    `rules` is `config.sharding_rules`: the batch is split as its `batch`
    rule says, as `predict_fn`'s input sharding (`Experiment.
    jit_eval_predict`) expects; None = `sharding.DEFAULT_BATCH_RULE`.

    Raises:
      ValueError: if `config.batch_size` is not a multiple of the
        data-parallel device count and of the process count.
    """
    self.name = name
    self.config = config
    self.predict_fn = predict_fn
    self.source = source
    self.preprocess_fn = preprocess_fn
    self.mesh = mesh
    self.rules = rules
    self.seed = seed
    self.workdir = workdir
    dp = sharding.data_parallel_size(mesh, rules)
    if config.batch_size % dp or config.batch_size % jax.process_count():
      raise ValueError(
          f"config.evals.{name}.batch_size={config.batch_size}: expected a "
          f"multiple of the {dp} data-parallel devices and the "
          f"{jax.process_count()} processes"
      )

  @abc.abstractmethod
  def run(self, params: Any, batch_stats: Any, *, step: int) -> dict:
    """Evaluates the given weights; returns a flat dict of metrics."""
