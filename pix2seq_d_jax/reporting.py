"""Metric writers, the JSON-lines log, progress lines, terminal and cadences.

Process 0 writes TensorBoard events and `metrics.jsonl` (one JSON object per
logged step, for tests and notebooks); other processes only log. The event
writer needs no TensorFlow: clu's `MetricWriter` interface cannot be
imported without it (the `clu.metric_writers` package imports its TF summary
writer) and neither can tensorboard's `EventFileWriter` when TF is installed
(it resolves `tensorboard.compat.tf` to TensorFlow), so `EventWriter` writes
the records itself with the same method names. `itstime` is the one function
that decides periodic actions; `configure_terminal` keeps library start-up
noise off the terminal.
"""

from __future__ import annotations

import itertools
import json
import logging as py_logging
import math
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from pix2seq_d_jax.formats import atomic, paths

# Libraries whose INFO records are start-up or bookkeeping noise (backend
# probing, every checkpoint save, data loader workers).
_LIBRARY_PATHS = (
    "/jax/", "/jaxlib/", "/orbax/", "/grain/", "/etils/", "/flax/", "/clu/",
    "/tensorflow/", "/tensorflow_datasets/", "/tensorboard/",
)
_LIBRARY_LOGGERS = ("jax", "orbax", "grain", "tensorflow", "tensorboard")
# Zero-padded so event files sort in creation order within one process.
_file_uid = itertools.count()


class _ObjectFile:
  """A binary file on an object store that every `flush` makes durable.

  Objects cannot be appended to, and a bucket file opened for writing
  (fsspec's gcsfs, for one) uploads nothing before `close`, so a killed run
  would lose its whole events file. This one keeps the content and uploads
  all of it at each `flush`; events files get a few records per log step,
  so the re-upload stays small.
  """

  def __init__(self, path: epath.Path):
    self._path = path
    self._chunks: list[bytes] = []
    self.closed = False

  def write(self, data: bytes) -> int:
    self._chunks.append(bytes(data))
    return len(data)

  def flush(self) -> None:
    self._path.write_bytes(b"".join(self._chunks))

  def close(self) -> None:
    if not self.closed:
      self.flush()
      self.closed = True


def append_text(path: str | os.PathLike, text: str) -> None:
  """Appends `text` to `path`; on a bucket, rewrites the object with it.

  Object stores have no append (gcsfs falls back to overwriting), so a
  remote file is read, extended and written whole; callers append rarely
  (log steps) to small files.
  """
  file = epath.Path(path)
  if not paths.is_url(path):
    with file.open("a") as f:
      f.write(text)
    return
  old = file.read_text() if file.exists() else ""
  file.write_text(old + text)


def itstime(
    step: int,
    every_n_steps: int | None,
    total_steps: int,
    *,
    first: bool = False,
    last: bool = True,
) -> bool:
  """Whether a periodic action runs after `step` (1-based).

  Runs every `every_n_steps`, optionally after the first step, and at the
  last step; `every_n_steps` None or 0 means only at the last step (if
  `last`).
  """
  is_last = step == total_steps
  if last and is_last:
    return True
  if first and step == 1:
    return True
  if not every_n_steps:
    return False
  return step % every_n_steps == 0


def compiled_memory(compiled: Any) -> dict[str, int]:
  """Byte counts of XLA's memory analysis of a compiled step ({} if absent).

  Some backends do not implement the analysis; that is not an error.
  """
  try:
    mem = compiled.memory_analysis()
  except (NotImplementedError, AttributeError):
    return {}
  if mem is None:
    return {}
  return {
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
  }


# ------------------------------------------------------------------ terminal


class _LibraryInfoFilter(py_logging.Filter):
  """Drops records below WARNING that come from the libraries' own files."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
        part in record.pathname for part in _LIBRARY_PATHS
    )


def configure_terminal(verbosity: int = 0) -> None:
  """Keeps TF/XLA/jax/orbax start-up and INFO noise off the terminal.

  Call it first thing in a CLI's main, before any backend is initialised
  (TensorFlow and XLA read `TF_CPP_MIN_LOG_LEVEL` when they first log). At
  `verbosity` <= 0 (absl's default) the C++ INFO notices (oneDNN, CPU
  features), jax's `Unable to initialize backend 'tpu'` and the libraries'
  INFO records are hidden; our own INFO lines and every warning still show.
  `--verbosity=1` (or more) shows everything again. Safe to call twice.

  Args:
    verbosity: absl's `--verbosity` value (`flags.FLAGS.verbosity`).
  """
  quiet = verbosity <= 0
  if quiet:
    # An explicit user setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  handlers = [logging.get_absl_handler(), *py_logging.getLogger().handlers]
  for handler in handlers:
    for f in [f for f in handler.filters
              if isinstance(f, _LibraryInfoFilter)]:
      handler.removeFilter(f)
    if quiet:
      handler.addFilter(_LibraryInfoFilter())
  for name in _LIBRARY_LOGGERS:
    py_logging.getLogger(name).setLevel(
        py_logging.WARNING if quiet else py_logging.NOTSET
    )


# ------------------------------------------------------------ event writer


class EventWriter:
  """Writes TensorBoard scalars and hparams to one new events file, no TF.

  Same method names as clu's `MetricWriter` (`write_scalars`,
  `write_hparams`, `flush`, `close`). Every write is flushed: writes happen
  only at log steps, and a killed run then loses nothing.
  """

  def __init__(self, logdir: str, *, purge_from_step: int | None = None):
    """Creates the file.

    Args:
      logdir: directory of the run (created if missing).
      purge_from_step: if set, a `SessionLog(START)` event at this step makes
        TensorBoard's Python loader drop every earlier-written event at this
        step or later (orphans of a run resumed from an earlier checkpoint).
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer import record_writer

    self._event_pb2 = event_pb2
    folder = epath.Path(logdir)
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path = folder / (
        f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}."
        f"{os.getpid()}.{next(_file_uid):04d}.v2"
    )
    self.path = os.fspath(path)
    self._file = (
        _ObjectFile(path) if paths.is_url(logdir) else path.open("wb"))
    self._records = record_writer.RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))
    if purge_from_step is not None:
      self._write(event_pb2.Event(
          wall_time=now, step=int(purge_from_step),
          session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START),
      ))

  def _write(self, event: Any) -> None:
    self._records.write(event.SerializeToString())
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes numbers as TensorBoard scalars (float32 `simple_value`)."""
    from tensorboard.compat.proto import summary_pb2

    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    self._write(self._event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=summary_pb2.Summary(value=values),
    ))

  def write_hparams(
      self, hparams: Mapping[str, bool | int | float | str]
  ) -> None:
    """Writes hyperparameters for TensorBoard's HParams dashboard."""
    from tensorboard.plugins.hparams import summary_v2

    summary = summary_v2.hparams_pb(dict(hparams))
    self._write(self._event_pb2.Event(wall_time=time.time(), summary=summary))

  def flush(self) -> None:
    """Flushes the file (every write already does)."""
    if not self._file.closed:
      self._file.flush()

  def close(self) -> None:
    """Closes the file; later calls are no-ops."""
    if not self._file.closed:
      self._file.close()


# ----------------------------------------------------------------- reporter


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
      return str(value)
    return value
  return value.tolist()


def _format_number(value: Any) -> str:
  """3 significant digits; integers in full; no exponent below 1e6."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int | np.integer):
    return str(int(value))
  value = float(value)
  if not math.isfinite(value):
    return str(value)
  if 100 <= abs(value) < 1e6:
    return f"{float(f'{value:.3g}'):.0f}"
  return f"{value:.3g}"


def _format_duration(secs: float) -> str:
  secs = max(int(round(secs)), 0)
  return f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def truncate_jsonl(path: str, last_step: int) -> int:
  """Drops rows of `path` with `step` > `last_step`; returns how many.

  A resumed run redoes those steps, so their rows would appear twice.
  Unparseable lines (a write cut by a kill) are dropped too. The file is
  replaced atomically, so a crash here never loses the kept rows.
  """
  file = epath.Path(path)
  if not file.exists():
    return 0
  kept, dropped = [], 0
  with file.open("r") as f:
    for line in f:
      try:
        row = json.loads(line)
        keep = int(row["step"]) <= last_step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    atomic.write_text(path, "".join(kept))
  return dropped


class Reporter:
  """Writes scalars to TensorBoard and `<workdir>/metrics.jsonl`; progress.

  Only process 0 writes files and progress lines. Training scalars go to the
  terminal only through the progress line; evaluation scalars get one INFO
  line per evaluator; everything else is at DEBUG.
  """

  def __init__(
      self,
      workdir: str,
      *,
      total_steps: int,
      start_step: int | None = None,
      every_secs: float = 30.0,
  ):
    """Opens the writers.

    Args:
      workdir: run directory.
      total_steps: last step of the run (for progress and ETA).
      start_step: the step training resumes from (0 for a fresh start), or
        None to keep existing logs as they are. Rows with a later step are
        removed from `metrics.jsonl`, and the new events file tells
        TensorBoard to drop the old events after it.
      every_secs: at most one progress line per this many seconds (plus the
        first and the last step).
    """
    import jax  # Not at module level: configure_terminal runs before jax.

    self.is_lead = jax.process_index() == 0
    self.workdir = workdir
    self.total_steps = total_steps
    self.every_secs = every_secs
    self.jsonl_path = os.fspath(epath.Path(workdir) / "metrics.jsonl")
    self.writer = None
    self._last_loss: float | None = None
    self._first: tuple[int, float] | None = None
    self._last: tuple[int, float] | None = None
    if not self.is_lead:
      return
    purge_from = None
    if start_step is not None:
      dropped = truncate_jsonl(self.jsonl_path, start_step)
      if dropped:
        logging.info("Dropped %d rows after step %d from %s.", dropped,
                     start_step, self.jsonl_path)
      purge_from = start_step + 1
    self.writer = EventWriter(workdir, purge_from_step=purge_from)

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    """Writes slash-named scalars (`train/loss`) for `step`.

    Values may be Python, numpy or (fetched or not) jax scalars; non-finite
    floats are kept in the JSON log as strings and left out of TensorBoard.
    """
    step = int(step)
    scalars = {k: _to_python(v) for k, v in scalars.items()}
    loss = scalars.get("train/loss")
    if isinstance(loss, int | float):
      self._last_loss = float(loss)
    if not self.is_lead:
      return
    numeric = {
        k: v for k, v in scalars.items() if isinstance(v, int | float)
    }
    self.writer.write_scalars(step, numeric)
    append_text(self.jsonl_path,
                json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")
    evals: dict[str, list[str]] = {}
    for key, value in scalars.items():
      parts = key.split("/")
      if parts[0] == "eval" and len(parts) == 3:
        evals.setdefault(parts[1], []).append(
            f"{parts[2]} {_format_number(value)}"
            if isinstance(value, int | float) else f"{parts[2]} {value}"
        )
    for name, items in evals.items():
      logging.info("step %d  eval %s: %s", step, name, "  ".join(items))
    logging.debug("step %d  %s", step, scalars)

  def write_config(self, config_dict: dict[str, Any]) -> None:
    """Writes the resolved config as `<workdir>/config.json` and hparams."""
    if not self.is_lead:
      return
    atomic.write_json(epath.Path(self.workdir) / "config.json", config_dict,
                      indent=2, sort_keys=True, default=str)
    self.writer.write_hparams(
        {k: v for k, v in _flatten(config_dict).items()
         if isinstance(v, int | float | str | bool)}
    )

  def step_done(self, step: int) -> None:
    """Logs `step N/T  X steps/s  loss L  ETA hh:mm:ss` when one is due.

    Due at the first call, then at most once per `every_secs`, and at the
    last step. Call it after `write_scalars` of the same step so the loss is
    current (it is the last `train/loss` written). steps/s is measured over
    the interval; the ETA uses the rate since the first call, which counts
    the evaluations that will recur.
    """
    if not self.is_lead:
      return
    now = time.monotonic()
    if self._first is None:
      self._first = self._last = (step, now)
      self._log_progress(step, None, None)
      return
    last_step, last_t = self._last
    if now - last_t < self.every_secs and step != self.total_steps:
      return
    rate = (step - last_step) / max(now - last_t, 1e-9)
    first_step, first_t = self._first
    mean_rate = (step - first_step) / max(now - first_t, 1e-9)
    eta = (self.total_steps - step) / max(mean_rate, 1e-9)
    self._last = (step, now)
    self._log_progress(step, rate, eta)

  def _log_progress(self, step: int, rate: float | None,
                    eta: float | None) -> None:
    parts = [f"step {step}/{self.total_steps}"]
    if rate is not None:
      parts.append(f"{rate:.3g} steps/s")
    if self._last_loss is not None:
      parts.append(f"loss {self._last_loss:.4g}")
    if eta is not None:
      parts.append(f"ETA {_format_duration(eta)}")
    logging.info("%s", "  ".join(parts))

  def flush(self) -> None:
    """Flushes the events file."""
    if self.writer is not None:
      self.writer.flush()

  def close(self) -> None:
    """Closes the events file."""
    if self.writer is not None:
      self.writer.close()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


# --------------------------------------------------------------- parameters


def _si(n: int) -> str:
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
    if n >= scale:
      return f"{n / scale:.3g}{suffix}"
  return str(n)


def _num_params(tree: Any) -> int:
  import jax

  # np.shape reads `.shape`, so ShapeDtypeStructs count without arrays.
  return sum(math.prod(np.shape(leaf))
             for leaf in jax.tree_util.tree_leaves(tree))


def log_parameters(params: Any, workdir: str | None) -> int:
  """Writes the parameter table to `<workdir>/parameters.txt`; logs totals.

  The full table (hundreds of lines at paper scale) goes to the file and to
  DEBUG; INFO gets one line with the total per top-level module.

  Args:
    params: parameter pytree; arrays or `jax.ShapeDtypeStruct`s (so the
      abstract state can be described before anything is allocated).
    workdir: run directory, or None to write no file.

  Returns:
    The total number of parameters.
  """
  import jax
  from clu import parameter_overview

  table = parameter_overview.get_parameter_overview(
      params, include_stats=False
  )
  logging.debug("Parameters:\n%s", table)
  path = None
  if workdir and jax.process_index() == 0:
    folder = epath.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = os.fspath(folder / "parameters.txt")
    (folder / "parameters.txt").write_text(table + "\n")
  top = params
  while isinstance(top, Mapping) and list(top) == ["params"]:
    top = top["params"]
  total = _num_params(params)
  modules = ""
  if isinstance(top, Mapping):
    modules = ": " + ", ".join(
        f"{k} {_si(_num_params(v))}" for k, v in top.items()
    )
  logging.info("Parameters: %s total (%s)%s%s", f"{total:,}", _si(total),
               modules, f"; table in {path}" if path else "")
  return total


# ------------------------------------------------------------------ results


def format_metrics_table(
    results: Mapping[str, Mapping[str, Any]],
    paths: Mapping[str, str] | None = None,
) -> str:
  """A short text table of evaluation results, for the end of a run.

  Args:
    results: evaluator name -> metric name -> value. Numbers are shown with
      3 significant digits (integers in full); other values are left out.
    paths: label -> path (e.g. predictions, overlays), listed below.

  Returns:
    One row per metric and one column per evaluator, then the paths.
  """
  names = list(results)
  metrics: list[str] = []
  for name in names:
    for metric, value in results[name].items():
      if (isinstance(value, int | float | np.number)
          and metric not in metrics):
        metrics.append(metric)
  rows = [["metric", *names]]
  for metric in metrics:
    rows.append([metric] + [
        _format_number(results[n][metric]) if metric in results[n] else "-"
        for n in names
    ])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = [
      "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
      for r in rows
  ]
  if paths:
    width = max(len(k) for k in paths)
    lines += [f"{k.ljust(width)}  {v}" for k, v in paths.items()]
  return "\n".join(lines)
