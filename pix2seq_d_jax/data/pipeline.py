"""grain input pipelines: an endless shuffled train loader and padded eval.

Training uses `grain.DataLoader` over a random-access source: an
`IndexSampler` shuffles each epoch deterministically from the seed and
repeats forever, each process reads a disjoint shard (`ShardOptions`, equal
shard sizes), `preprocess_fn(raw, rng)` runs as a grain `RandomMap` whose rng
grain derives from (seed, global record index), and the index encodes epoch
and position, so the randomness is reproducible and independent of the number
of workers. Batches are dicts of numpy arrays with a leading `batch_size`
dimension (`drop_remainder`). The iterator's `get_state()` / `set_state()`
resume exactly; save the state with every checkpoint.
Evaluation walks the examples in a fixed order in global batches of
`batch_size * n` examples, process i taking rows [i * batch_size,
(i + 1) * batch_size) of each, so example k lands in the same global batch
and row whatever the process count (a per-batch sampling key then gives the
same predictions with 1 or n processes). The last batch is padded with
copies of a real example flagged `_mask=False`, so every process yields the
same number of full batches and every example is counted exactly once
(`_mask=True`). `_index` is each row's example index; with a skipping source
a bad example's row holds its substitute, `_mask=False`, `_skipped=True`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sized
from typing import Any, Protocol

import grain
import jax
import numpy as np


class RandomAccessSource(Protocol):
  """What the loaders need from a source (grain's RandomAccessDataSource)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


TrainPreprocessFn = Callable[[dict[str, Any], np.random.Generator], dict]
EvalPreprocessFn = Callable[[dict[str, Any]], dict]


@dataclasses.dataclass(frozen=True)
class _PreprocessMap(grain.transforms.RandomMap):
  """Applies preprocess_fn(raw, rng); picklable for worker processes."""

  preprocess_fn: TrainPreprocessFn

  def random_map(self, element: dict[str, Any], rng: np.random.Generator):
    return self.preprocess_fn(element, rng)


def _shard_args(
    shard_index: int | None, shard_count: int | None
) -> tuple[int, int]:
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(
        f'Need 0 <= shard_index < shard_count, got shard_index={shard_index},'
        f' shard_count={shard_count}.'
    )
  return shard_index, shard_count


def make_train_loader(
    source: RandomAccessSource,
    *,
    batch_size: int,
    seed: int,
    preprocess_fn: TrainPreprocessFn,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    read_buffer_size: int = 64,
) -> grain.DataLoaderIterator:
  """Returns an endless iterator of training batches for this process.

  Args:
    source: random-access source of raw examples.
    batch_size: examples per batch on this process.
    seed: shuffling and augmentation seed (a non-negative int).
    preprocess_fn: `fn(raw, rng) -> dict` of fixed-shape numpy arrays; must be
      picklable when num_workers > 0 (a module-level function or a
      functools.partial of one).
    shard_index: this process's shard; defaults to jax.process_index().
    shard_count: number of shards; defaults to jax.process_count().
    num_workers: grain worker processes (0 = in this process). Workers need
      parsed absl flags and a `__main__` guard.
    worker_buffer_size: batches buffered per worker.
    read_threads: threads reading (decoding) raw examples.
    read_buffer_size: raw examples prefetched by those threads.

  Returns:
    A grain `DataLoaderIterator` yielding dicts of numpy arrays with leading
    dimension batch_size; it has `get_state()` / `set_state(state)`.

  Raises:
    ValueError: on invalid sizes or shards, or if the shard is smaller than
      one batch.
  """
  shard_index, shard_count = _shard_args(shard_index, shard_count)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  if len(source) // shard_count < batch_size:
    raise ValueError(
        f'Source of {len(source)} examples split into {shard_count} shards '
        f'cannot fill one batch of {batch_size}.'
    )
  # drop_remainder gives every process the same shard size, hence the same
  # number of steps per epoch.
  shard_options = grain.sharding.ShardOptions(
      shard_index=shard_index, shard_count=shard_count, drop_remainder=True
  )
  # grain seeds example i's rng with Philox(key=seed + i), so user seeds s and
  # s + 1 would give shifted copies of one random stream; a hashed seed keeps
  # different seeds unrelated.
  sampler_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=shard_options,
      shuffle=True,
      num_epochs=None,
      seed=sampler_seed,
  )
  loader = grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=[
          _PreprocessMap(preprocess_fn),
          grain.transforms.Batch(batch_size, drop_remainder=True),
      ],
      worker_count=num_workers,
      worker_buffer_size=worker_buffer_size,
      shard_options=shard_options,
      read_options=grain.ReadOptions(
          num_threads=read_threads, prefetch_buffer_size=read_buffer_size
      ),
  )
  return iter(loader)


def _eval_count(source: Sized, max_examples: int | None) -> int:
  n = len(source)
  return n if max_examples is None else min(n, max_examples)


def num_eval_batches(
    source: Sized,
    *,
    batch_size: int,
    shard_count: int,
    max_examples: int | None = None,
) -> int:
  """Returns the number of batches each process yields in evaluation.

  Args:
    source: the eval source (only its length is used).
    batch_size: examples per batch on each process.
    shard_count: number of processes.
    max_examples: evaluate only the first n examples.

  Returns:
    ceil(ceil(n / shard_count) / batch_size), the same for every process.
  """
  per_shard = math.ceil(_eval_count(source, max_examples) / shard_count)
  return math.ceil(per_shard / batch_size)


def _eval_indices(
    n: int, batch_size: int, shard_index: int, shard_count: int
) -> tuple[np.ndarray, np.ndarray]:
  """Returns (example index, is_real) of every element this process yields.

  Global batch g holds examples [g * B, (g + 1) * B), B = batch_size *
  shard_count; this process takes its block of batch_size rows of each.
  """
  global_size = batch_size * shard_count
  num_batches = math.ceil(n / global_size)
  rows = (np.arange(num_batches)[:, None] * global_size
          + shard_index * batch_size + np.arange(batch_size)).ravel()
  mask = rows < n
  # Padding copies a real example (this shard's first, else example 0) so
  # padded batches go through the same preprocessing.
  pad_with = rows[0] if mask.any() else 0
  indices = np.where(mask, rows, pad_with).astype(np.int64)
  return indices, mask


def make_eval_batches(
    source: RandomAccessSource,
    *,
    batch_size: int,
    preprocess_fn: EvalPreprocessFn,
    shard_index: int | None = None,
    shard_count: int | None = None,
    max_examples: int | None = None,
    read_threads: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's evaluation batches in a fixed order.

  Process i gets rows [i * batch_size, (i + 1) * batch_size) of each global
  batch of batch_size * shard_count consecutive examples of the first n; the
  last batches are padded with copies of a real example, `_mask` False, so
  all processes yield `num_eval_batches(...)` batches of exactly batch_size.
  A source with `read_with_index` (a `SkippingSource`) that substitutes a
  bad example gives that row `_mask` False and `_skipped` True.

  Args:
    source: random-access source of raw examples.
    batch_size: examples per batch on this process.
    preprocess_fn: `fn(raw) -> dict` of fixed-shape numpy arrays.
    shard_index: this process's shard; defaults to jax.process_index().
    shard_count: number of shards; defaults to jax.process_count().
    max_examples: evaluate only the first n examples.
    read_threads: threads reading and preprocessing examples.

  Returns:
    An iterator of dicts of numpy arrays [batch_size, ...] plus `_mask` and
    `_skipped` bool [batch_size] and `_index` int64 [batch_size] (the
    example index the row stands for).

  Raises:
    ValueError: on invalid sizes or shards.
  """
  shard_index, shard_count = _shard_args(shard_index, shard_count)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  n = _eval_count(source, max_examples)
  if n == 0:
    return iter(())
  indices, mask = _eval_indices(n, batch_size, shard_index, shard_count)

  read_with_index = getattr(source, 'read_with_index', None)

  def load(i: int) -> dict[str, np.ndarray]:
    index = int(indices[i])
    if read_with_index is None:
      raw, read = source[index], index
    else:
      raw, read = read_with_index(index)
    ex = dict(preprocess_fn(raw))
    # A substitute for a bad example is another real example: counting it
    # here too would score that one twice.
    ex['_mask'] = np.asarray(mask[i] and read == index)
    ex['_skipped'] = np.asarray(mask[i] and read != index)
    ex['_index'] = np.asarray(index, np.int64)
    return ex

  ds = (
      grain.MapDataset.range(len(indices))
      .map(load)
      .to_iter_dataset(
          grain.ReadOptions(
              num_threads=read_threads, prefetch_buffer_size=2 * batch_size
          )
      )
      .batch(batch_size, drop_remainder=True)
  )
  return iter(ds)
