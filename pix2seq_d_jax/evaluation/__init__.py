"""Dataset-independent evaluation metrics (panoptic quality, panopticapi rules).

Names are resolved lazily from `panoptic` so that running the module as a
script (`python -m pix2seq_d_jax.evaluation.panoptic`) does not import it twice
and trigger runpy's warning.
"""

import importlib
from typing import Any

_EXPORTS = (
  "PQStat",
  "PQStatCat",
  "format_table",
  "pq_compute",
  "pq_single_image",
  "summarize",
)

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    module = importlib.import_module("pix2seq_d_jax.evaluation.panoptic")
    return getattr(module, name)
  raise AttributeError(
    f"module 'pix2seq_d_jax.evaluation' has no attribute {name!r}; "
    f"available: {', '.join(_EXPORTS)}"
  )
