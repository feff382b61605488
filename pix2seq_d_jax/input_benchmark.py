r"""Input throughput of training: the real loader on a COCO-sized fixture.

  python -m pix2seq_d_jax.input_benchmark [--config=configs/coco.py] \
      [--data_dir DIR] [--num_images 64] [--fixture_size 640,480] \
      [--num_workers 0,1,2] [--batch_size 8] [--batches 10] \
      [--profile_examples 16] [--output results.json] \
      [--config.input.image_size=1024 --config.input.mask_size=256 ...]

Answers "does the input pipeline limit training?" with the code training
runs, nothing re-implemented: the fixture is the synthetic renderer's scenes
written by `synthetic.write_coco_layout` in COCO's on-disk layout (JPEGs,
panoptic PNGs, JSON; width x height given by `--fixture_size`), read by the
registry's `coco_panoptic` source and preprocessed by the config's training
function (`experiment.train_preprocess_fn`). The config's batch size and
worker count are not used: `--batch_size` and `--num_workers` replace them.

Loader. Each worker count gets a fresh `pipeline.make_train_loader`; the first
batch (process start-up included) is reported separately, then warm-up
batches are drawn and discarded, by default 1 + workers * (worker buffer + 1)
so that every timed batch is produced inside the timed window. Then
`--batches` batches are timed back to back: examples/s is their example count
over their time, the rate the pipeline can feed a step that takes no time.

Per-op breakdown. `source[i]` and the preprocess function run on
`--profile_examples` examples under `cProfile` with the thread's CPU clock
(other processes sharing the cores do not inflate it). Each row is a
function called directly by the reader (`CocoPanopticSource._read`: decoding,
id mapping) or by the preprocess function, with the CPU time spent inside it;
the two `(self)` rows are the lines of those two functions themselves, so the
shares add up to 1.
"""

from __future__ import annotations

import cProfile
import functools
import gc
import inspect
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import pix2seq_d_jax
from pix2seq_d_jax import config_lib, experiment
from pix2seq_d_jax import data as data_lib
from pix2seq_d_jax.data import pipeline, synthetic
from pix2seq_d_jax.formats import atomic

_FIXTURE_DEFAULTS = {'num_images': 64, 'height': 480, 'width': 640, 'seed': 0}
# make_train_loader's default, which train.py keeps.
_WORKER_BUFFER_SIZE = inspect.signature(
    pipeline.make_train_loader
).parameters['worker_buffer_size'].default
_PACKAGE_DIR = os.path.dirname(os.path.abspath(pix2seq_d_jax.__file__))


def ensure_fixture(data_dir: str, **params: Any) -> str:
  """Returns the COCO-layout fixture under `data_dir`, written on first use.

  Args:
    data_dir: cache folder; the fixture's folder name hashes its parameters.
    **params: any of num_images, height, width, seed (see
      `synthetic.write_coco_layout`).

  Returns:
    The dataset root (its `train` split is the fixture).
  """
  return synthetic.ensure_cached(
      data_dir, 'coco_layout', _FIXTURE_DEFAULTS, synthetic.GENERATOR_VERSION,
      synthetic.write_coco_layout, params,
  )


def fixture_stats(root: str) -> dict[str, float]:
  """Image count, mean file sizes (kB) and segments per image of a fixture."""
  with open(os.path.join(root, 'annotations', 'panoptic_train2017.json')) as f:
    content = json.load(f)
  jpeg = [os.path.getsize(os.path.join(root, 'train2017', im['file_name']))
          for im in content['images']]
  png = [os.path.getsize(os.path.join(root, 'annotations',
                                      'panoptic_train2017', a['file_name']))
         for a in content['annotations']]
  return {
      'num_images': len(jpeg),
      'jpeg_kb': float(np.mean(jpeg)) / 1e3,
      'png_kb': float(np.mean(png)) / 1e3,
      'segments': float(np.mean(
          [len(a['segments_info']) for a in content['annotations']])),
  }


def _close(iterator: Any) -> None:
  """Stops a grain iterator's worker processes now.

  `DataLoaderIterator` has no public close; its inner iterator does. Without
  it the previous loader's workers could still fill their buffers while the
  next one is timed.
  """
  close = getattr(getattr(iterator, '_iterator', None), 'close', None)
  if close is not None:
    close()


def time_loader(
    source: pipeline.RandomAccessSource,
    preprocess_fn: Callable[..., dict[str, np.ndarray]],
    *,
    batch_size: int,
    num_workers: int,
    batches: int,
    warmup_batches: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
  """Times the train loader with `num_workers` worker processes.

  Args:
    source: random-access source of raw examples.
    preprocess_fn: the training preprocess function.
    batch_size: examples per batch.
    num_workers: grain worker processes (0 = in this process).
    batches: timed batches (>= 1).
    warmup_batches: untimed batches after the first; None = 1 + num_workers
      * (worker buffer + 1).
    seed: loader seed.

  Returns:
    num_workers, first_batch_s, warmup_batches, examples, total_s,
    examples_per_s (= examples / total_s), ms_per_batch, median_ms_per_batch,
    mb_per_batch (10^6 bytes) and batch_times_s.

  Raises:
    ValueError: on a bad count (names the flag).
  """
  if batches < 1:
    raise ValueError(f'--batches must be >= 1, got {batches}.')
  if num_workers < 0:
    raise ValueError(f'--num_workers must be >= 0, got {num_workers}.')
  if warmup_batches is None:
    warmup_batches = 1 + num_workers * (_WORKER_BUFFER_SIZE + 1)
  t0 = time.perf_counter()
  it = pipeline.make_train_loader(
      source, batch_size=batch_size, seed=seed, preprocess_fn=preprocess_fn,
      shard_index=0, shard_count=1, num_workers=num_workers,
  )
  try:
    first = next(it)
    first_batch_s = time.perf_counter() - t0
    nbytes = sum(np.asarray(v).nbytes for v in first.values())
    del first
    for _ in range(warmup_batches):
      next(it)
    times = []
    start = prev = time.perf_counter()
    for _ in range(batches):
      next(it)
      now = time.perf_counter()
      times.append(now - prev)
      prev = now
  finally:
    _close(it)
    del it  # releases the shared memory of the last worker batches
    gc.collect()
  total = prev - start
  examples = batches * batch_size
  return {
      'num_workers': num_workers,
      'first_batch_s': first_batch_s,
      'warmup_batches': warmup_batches,
      'examples': examples,
      'total_s': total,
      'examples_per_s': examples / total,
      'ms_per_batch': 1e3 * total / batches,
      'median_ms_per_batch': 1e3 * statistics.median(times),
      'mb_per_batch': nbytes / 1e6,
      'batch_times_s': times,
  }


def _location(fn: Callable[..., Any]) -> tuple[str, int]:
  """(file, first line) of a function or partial, as cProfile labels it."""
  while isinstance(fn, functools.partial):
    fn = fn.func
  code = fn.__code__
  return code.co_filename, code.co_firstlineno


def _op_name(label: tuple[str, int, str]) -> str:
  """`module.function` of a cProfile label; builtins by their C name.

  Modules of this package are named from the package root
  (`data.preprocess`), others by file name (`posixpath`).
  """
  filename, _, name = label
  if filename == '~':  # e.g. "<method 'astype' of 'numpy.ndarray' objects>"
    parts = name.strip('<>').replace("'", '').split()
    if parts[0] == 'method' and len(parts) >= 4:
      return f'{parts[3].split(".")[-1]}.{parts[1]}'
    return parts[-1]
  if filename.startswith('<frozen '):  # e.g. '<frozen posixpath>'
    return f'{filename[len("<frozen "):-1]}.{name}'
  module = os.path.splitext(os.path.abspath(filename))[0]
  if module.startswith(_PACKAGE_DIR + os.sep):
    module = os.path.relpath(module, _PACKAGE_DIR).replace(os.sep, '.')
  else:
    module = os.path.basename(module)
  return f'{module}.{name}'


def profile_preprocessing(
    source: Any,
    preprocess_fn: Callable[..., dict[str, np.ndarray]],
    *,
    num_examples: int,
    seed: int = 0,
) -> dict[str, Any]:
  """CPU time per op of reading and preprocessing, from `cProfile`.

  Args:
    source: a `coco_panoptic`-style source (reads in `_read`).
    preprocess_fn: the training preprocess function.
    num_examples: examples profiled, cycling over the source (>= 1).
    seed: seed of each example's random draws.

  Returns:
    `examples`, `total_ms` (CPU ms per example of the reader and the
    preprocess function) and `ops`: rows {op, calls, ms, share} per example,
    most expensive first; shares sum to 1.

  Raises:
    ValueError: on a bad count (names the flag).
  """
  if num_examples < 1:
    raise ValueError(f'--profile_examples must be >= 1, got {num_examples}.')
  # SkippingSource.__getitem__ only dispatches to _read, the decode chain.
  entries = {_location(type(source)._read), _location(preprocess_fn)}
  profiler = cProfile.Profile(time.thread_time)
  for i in range(num_examples):
    rng = np.random.default_rng([seed, i])
    profiler.enable()
    try:
      preprocess_fn(source[i % len(source)], rng)
    finally:
      profiler.disable()
  stats = pstats.Stats(profiler).stats
  ops: dict[str, list[float]] = {}
  total = 0.0
  for label, (_, calls, own, cum, callers) in stats.items():
    if label[:2] in entries:
      total += cum
      ops[f'{_op_name(label)} (self)'] = [calls, own]
    for caller, (caller_calls, _, _, caller_cum) in callers.items():
      if caller[:2] in entries:
        row = ops.setdefault(_op_name(label), [0, 0.0])
        row[0] += caller_calls
        row[1] += caller_cum
  rows = [
      {'op': op, 'calls': calls / num_examples,
       'ms': 1e3 * t / num_examples, 'share': t / total}
      for op, (calls, t) in ops.items()
  ]
  return {
      'examples': num_examples,
      'total_ms': 1e3 * total / num_examples,
      'ops': sorted(rows, key=lambda r: -r['ms']),
  }


def run(
    config: ml_collections.ConfigDict,
    data_dir: str,
    *,
    num_images: int = 64,
    fixture_size: tuple[int, int] = (640, 480),
    num_workers: Sequence[int] = (0, 1, 2),
    batch_size: int = 8,
    batches: int = 10,
    warmup_batches: int | None = None,
    profile_examples: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
  """Writes (or reuses) the fixture, times the loader, profiles the ops.

  Args:
    config: training config; its training preprocessing is measured.
    data_dir: cache folder of the fixture.
    num_images: fixture images.
    fixture_size: (width, height) of the fixture images.
    num_workers: worker counts to time, one loader each.
    batch_size: examples per batch.
    batches: timed batches per worker count.
    warmup_batches: see `time_loader`.
    profile_examples: examples of the per-op breakdown.
    seed: fixture, loader and profile seed.

  Returns:
    JSON-serialisable `setup`, `loader` (one `time_loader` dict per worker
    count) and `profile` (`profile_preprocessing`).

  Raises:
    ValueError: on invalid arguments (names the flag or config field).
  """
  config_lib.validate(config)
  if experiment.is_video(config):
    raise ValueError(
        f'--config: input.proceeding_frames={config.input.proceeding_frames} '
        'is a video config; this benchmark reads COCO-layout images.'
    )
  width, height = fixture_size
  # Every value is checked here, before the fixture is written, so a typo
  # fails in a second with one line naming the flag.
  checks = (
      (num_images >= 1, 'num_images', num_images, '>= 1'),
      (min(width, height) >= 16, 'fixture_size', f'{width},{height}',
       'two sides >= 16'),
      (len(num_workers) > 0 and min(num_workers) >= 0, 'num_workers',
       ','.join(map(str, num_workers)), 'counts >= 0'),
      (1 <= batch_size <= num_images, 'batch_size', batch_size,
       f'in [1, --num_images={num_images}]'),
      (batches >= 1, 'batches', batches, '>= 1'),
      (warmup_batches is None or warmup_batches >= 0, 'warmup_batches',
       warmup_batches, '>= 0'),
      (profile_examples >= 1, 'profile_examples', profile_examples, '>= 1'),
      (seed >= 0, 'seed', seed, '>= 0'),
  )
  for ok, flag, value, expected in checks:
    if not ok:
      raise ValueError(f'--{flag}={value}: expected {expected}.')
  load_start = os.getloadavg()[0]
  root = ensure_fixture(data_dir, num_images=num_images, height=height,
                        width=width, seed=seed)
  source = data_lib.get_source(
      'coco_panoptic', data_dir=root, split='train',
      skip_bad_examples=config.input.skip_bad_examples,
  )
  preprocess_fn = experiment.train_preprocess_fn(config)
  loader = []
  for workers in num_workers:
    logging.info('Timing the train loader with %d worker(s).', workers)
    loader.append(time_loader(
        source, preprocess_fn, batch_size=batch_size, num_workers=workers,
        batches=batches, warmup_batches=warmup_batches, seed=seed,
    ))
  logging.info('Profiling the preprocessing.')
  profile = profile_preprocessing(
      source, preprocess_fn, num_examples=profile_examples, seed=seed
  )
  return {
      'setup': {
          'preprocess': {k: list(v) if isinstance(v, tuple) else v
                         for k, v in preprocess_fn.keywords.items()},
          'fixture_size': [width, height],
          'batch_size': batch_size,
          'batches': batches,
          'seed': seed,
          'cpu_count': os.cpu_count(),
          # Other processes on the machine lower the loader rates.
          'load_average': [load_start, os.getloadavg()[0]],
          'fixture_root': root,
          'fixture': fixture_stats(root),
      },
      'loader': loader,
      'profile': profile,
  }


def format_report(results: dict[str, Any]) -> str:
  """The loader rates and the per-op CPU times as aligned text tables."""
  su, prof = results['setup'], results['profile']
  fx, pp = su['fixture'], su['preprocess']
  lines = [
      f"fixture: {fx['num_images']} images {su['fixture_size'][0]}x"
      f"{su['fixture_size'][1]}, JPEG {fx['jpeg_kb']:.0f} kB, PNG "
      f"{fx['png_kb']:.0f} kB, {fx['segments']:.1f} segments",
      f"preprocess: image {pp['image_size']}, mask {pp['mask_size']}, "
      f"scale_range {pp['scale_range']}, flip {pp['flip']}, colour jitter "
      f"{pp['color_jitter_strength']}; batch {su['batch_size']}, "
      f"{su['batches']} timed batches; {su['cpu_count']} CPUs, load "
      f"average {su['load_average'][0]:.1f} -> {su['load_average'][1]:.1f}",
      '',
      f"{'workers':>7}  {'examples/s':>10}  {'ms/batch':>9}  "
      f"{'MB/batch':>8}  {'first batch s':>13}",
  ]
  for r in results['loader']:
    lines.append(
        f"{r['num_workers']:>7}  {r['examples_per_s']:>10.2f}  "
        f"{r['ms_per_batch']:>9.1f}  {r['mb_per_batch']:>8.1f}  "
        f"{r['first_batch_s']:>13.2f}"
    )
  width = max(len(r['op']) for r in prof['ops'])
  lines += [
      '',
      f"CPU time per example (cProfile over {prof['examples']} examples):",
      f"{'op':<{width}}  {'calls':>5}  {'ms CPU':>7}  {'share':>6}",
  ]
  for r in prof['ops']:
    lines.append(f"{r['op']:<{width}}  {r['calls']:>5.1f}  {r['ms']:>7.2f}  "
                 f"{100 * r['share']:>5.1f}%")
  lines.append(
      f"{'total':<{width}}  {'':>5}  {prof['total_ms']:>7.2f}  100.0%  -> "
      f"{1e3 / prof['total_ms']:.1f} examples/s per unshared core"
  )
  return '\n'.join(lines)


# ------------------------------------------------------------------- CLI


def define_flags(
    flag_values: flags.FlagValues = flags.FLAGS,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Defines the CLI's flags in `flag_values`; returns their holders.

  Called only when run as a program (or by tests on their own FlagValues),
  so importing the module adds nothing to absl's global FLAGS.

  Args:
    flag_values: where to define the flags.
    argv: the command line whose `--config.` overrides become flags
      (default: sys.argv, as config_flags reads it).
  """
  fv = {'flag_values': flag_values}
  return dict(
      config=config_flags.DEFINE_config_file(
          'config', 'configs/coco.py',
          'Training config (path[:args]) whose preprocessing is measured.',
          lock_config=True, sys_argv=argv, **fv),
      data_dir=flags.DEFINE_string(
          'data_dir', None,
          'Cache folder of the fixture (reused when the parameters match); '
          'default: a temporary folder removed at exit.', **fv),
      num_images=flags.DEFINE_integer(
          'num_images', 64, 'Fixture images.', **fv),
      fixture_size=flags.DEFINE_list(
          'fixture_size', ['640', '480'], 'Width,height of the fixture.',
          **fv),
      num_workers=flags.DEFINE_list(
          'num_workers', ['0', '1', '2'], 'grain worker counts to time.',
          **fv),
      batch_size=flags.DEFINE_integer(
          'batch_size', 8, 'Examples per batch.', **fv),
      batches=flags.DEFINE_integer(
          'batches', 10, 'Timed batches per worker count.', **fv),
      warmup_batches=flags.DEFINE_integer(
          'warmup_batches', None,
          'Untimed batches after the first; default 1 + workers * '
          f'{_WORKER_BUFFER_SIZE + 1}.', **fv),
      profile_examples=flags.DEFINE_integer(
          'profile_examples', 16, 'Examples in the per-op breakdown.',
          **fv),
      seed=flags.DEFINE_integer('seed', 0, 'Seed.', **fv),
      output=flags.DEFINE_string(
          'output', None, 'Write the results as JSON to this file.', **fv),
  )


def _ints(cli: dict[str, Any], name: str, count: int | None) -> list[int]:
  """A comma-separated list flag as ints (`count` of them when given)."""
  values = cli[name].value
  try:
    out = [int(v) for v in values]
  except ValueError:
    out = None
  if out is None or not out or (count is not None and len(out) != count):
    raise ValueError(
        f"--{name}={','.join(values)}: expected {count or 'some'} "
        'comma-separated integers.'
    )
  return out


def main(argv: Sequence[str], cli: dict[str, Any]) -> dict[str, Any]:
  """Runs the benchmark from parsed flags, prints the tables, writes JSON.

  Args:
    argv: positional arguments left by absl (only the program name).
    cli: the holders returned by `define_flags`.

  Returns:
    The results dict (also written to `--output` when given).
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    width, height = _ints(cli, 'fixture_size', 2)
    workers = _ints(cli, 'num_workers', None)
    with tempfile.TemporaryDirectory(prefix='p2sd_input_bench_') as tmp:
      results = run(
          cli['config'].value,
          cli['data_dir'].value or tmp,
          num_images=cli['num_images'].value,
          fixture_size=(width, height),
          num_workers=workers,
          batch_size=cli['batch_size'].value,
          batches=cli['batches'].value,
          warmup_batches=cli['warmup_batches'].value,
          profile_examples=cli['profile_examples'].value,
          seed=cli['seed'].value,
      )
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(format_report(results))
  if cli['output'].value:
    atomic.write_json(cli['output'].value, results, indent=2)
    print(f"wrote {cli['output'].value}")
  return results


def _app_main(argv: Sequence[str], cli: dict[str, Any]) -> None:
  # app.run passes a non-None return value to sys.exit, which would print
  # the results dict and exit with status 1.
  main(argv, cli)


if __name__ == '__main__':
  _cli = define_flags()
  app.run(functools.partial(_app_main, cli=_cli))
