"""Atomic file writes: write `<path>.tmp-<unique>`, then rename over `path`.

A reader never sees a truncated file: the content lands under a temporary
name in the destination folder and a single rename publishes it (atomic on
POSIX file systems; on object stores such as `gs://` the rename is a
copy-then-delete, so readers still never see a partial object). Paths go
through `etils.epath`, so local folders and buckets are handled alike.
Missing parent folders are created.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically.

  Args:
    path: destination file (local path or a URL epath understands).
    data: the complete content.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Unique per call, not per process: two threads of one process may write
  # the same destination (e.g. a retried evaluation).
  tmp = path.parent / f'{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}'
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  write_bytes(path, text.encode('utf-8'))


def write_json(path: PathLike, obj: Any, **dumps_kwargs: Any) -> None:
  """Serialises `obj` with `json.dumps(obj, **dumps_kwargs)`, atomically.

  Args:
    path: destination file.
    obj: a JSON-serialisable value.
    **dumps_kwargs: passed to `json.dumps` (e.g. `indent`, `sort_keys`,
      `default`).

  Raises:
    TypeError: if `obj` is not serialisable; nothing is written then.
  """
  write_text(path, json.dumps(obj, **dumps_kwargs))
