"""In-training evaluators, selected by `type` in each `config.evals` entry.

`EVALUATORS` maps a type name to its class; `from_config` builds one
evaluator per entry of `config.evals`. Each evaluator takes the jitted
predict function and the eval data, runs over the whole split with padded,
masked batches, aggregates exact counts on the host and returns a flat dict
of metrics (`pq`, `sq`, `rq`, `pq_things`, ..., `J&F-Mean`, `stq`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EVALUATORS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator adding an evaluator to `EVALUATORS` under `name`."""

  def wrap(cls: type) -> type:
    if name in EVALUATORS:
      raise ValueError(f"evaluator {name!r} is registered twice")
    EVALUATORS[name] = cls
    return cls

  return wrap


def get_evaluator_class(name: str) -> type:
  """Looks up an evaluator type; the error lists the known names."""
  if name not in EVALUATORS:
    raise ValueError(
        f"unknown evaluator type {name!r}; known: {sorted(EVALUATORS)}"
    )
  return EVALUATORS[name]


def from_config(evals_config: Any, **shared: Any) -> dict[str, Any]:
  """Builds `{name: evaluator}` for every entry of `config.evals`."""
  out = {}
  for name, ev_config in evals_config.items():
    cls = get_evaluator_class(ev_config.type)
    out[name] = cls(name=name, config=ev_config, **shared)
  return out


# Imported for their registrations.
from pix2seq_d_jax.evaluators import (  # noqa: E402,F401
  coco_panoptic,
  davis_video,
  kitti_step_stq,
)
