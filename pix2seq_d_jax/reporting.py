"""Metric writers, the JSON-lines log, progress reports and cadences.

clu is used only through this module. Process 0 writes TensorBoard events
(clu's default writer) and `metrics.jsonl` (one JSON object per logged step,
for tests and notebooks); other processes only log. `itstime` is the one
function that decides periodic actions.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from clu import metric_writers, periodic_actions


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


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
      return str(value)
    return value
  return value.tolist()


class Reporter:
  """Writes scalars to TensorBoard (clu) and to `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str, *, total_steps: int):
    self.is_lead = jax.process_index() == 0
    self.workdir = workdir
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_lead, asynchronous=True
    )
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.progress = None
    if self.is_lead:
      self.progress = periodic_actions.ReportProgress(
          num_train_steps=total_steps, writer=self.writer, every_secs=30.0
      )

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    """Writes slash-named scalars (`train/loss`) for `step`."""
    scalars = {k: _to_python(v) for k, v in scalars.items()}
    numeric = {
        k: v for k, v in scalars.items() if isinstance(v, int | float)
    }
    self.writer.write_scalars(step, numeric)
    if self.is_lead:
      with open(self.jsonl_path, "a") as f:
        f.write(json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")

  def write_config(self, config_dict: dict[str, Any]) -> None:
    """Writes the resolved config as `<workdir>/config.json`."""
    if not self.is_lead:
      return
    path = os.path.join(self.workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    self.writer.write_hparams(
        {k: v for k, v in _flatten(config_dict).items()
         if isinstance(v, int | float | str | bool)}
    )

  def step_done(self, step: int) -> None:
    """Progress and ETA (ReportProgress logs steps/s as time/steps_per_sec)."""
    if self.progress is not None:
      self.progress(step)

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
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
