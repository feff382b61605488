"""The shared tail of the scorer command lines (PQ, J&F, STQ).

Each scorer parses its own flags, then hands `run_scorer` a function that
computes the results: errors of the user's making (missing files, bad
values) become one `error: ...` line and exit status 2 instead of a stack
trace; the results are written as JSON when asked (atomically, so a killed
run leaves no half-written file) and printed as the scorer's table.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from pix2seq_d_jax.formats import atomic

USER_ERRORS = (OSError, ValueError, KeyError, TypeError)


def run_scorer(compute: Callable[[], dict[str, Any]], output: str | None,
               format_table: Callable[[dict[str, Any]], str]) -> int:
  """Runs `compute()`, writes `output` JSON, prints the table.

  Returns:
    The process exit code: 0, or 2 after printing one error line.
  """
  start = time.time()
  try:
    results = compute()
    if output:
      atomic.write_json(output, results, indent=2)
  except USER_ERRORS as e:
    message = f'{type(e).__name__}: {e}'.replace('\n', ' ')
    print(f'error: {message}', file=sys.stderr)
    return 2
  print(format_table(results))
  print(f'Time elapsed: {time.time() - start:0.2f} seconds')
  return 0
