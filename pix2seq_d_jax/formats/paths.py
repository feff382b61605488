"""Local paths and URLs (`gs://`, `s3://`, ...) under one set of rules.

Every folder the framework reads or writes (workdir, data_dir, model_init,
predict inputs and outputs) may be a local path or a URL that
`etils.epath` understands. `os.path.abspath` must never see a URL: it turns
`gs://b/run` into `<cwd>/gs:/b/run`, a local folder. `absolute` makes local
paths absolute and leaves URLs as they are; `to_epath` returns the
`epath.Path` that reads and writes either.
"""

from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """True for `scheme://...` paths (buckets), False for local ones."""
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
  """`path` with `~` expanded and made absolute; a URL is returned as is."""
  path = os.fspath(path)
  if is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def to_epath(path: PathLike) -> epath.Path:
  """The `epath.Path` of `absolute(path)`."""
  return epath.Path(absolute(path))


def isdir(path: PathLike) -> bool:
  """`os.path.isdir` for local paths and URLs (False for "", not cwd)."""
  return bool(os.fspath(path)) and epath.Path(path).is_dir()


def isfile(path: PathLike) -> bool:
  """`os.path.isfile` for local paths and URLs (False for "")."""
  return bool(os.fspath(path)) and epath.Path(path).is_file()


def listdir(path: PathLike) -> list[str]:
  """`os.listdir` (entry names) for local paths and URLs."""
  return [p.name for p in epath.Path(path).iterdir()]


def read_bytes(path: PathLike) -> bytes:
  """The whole file at `path`, local or in a bucket, in one read.

  For a URL served by fsspec (etils' backend without TensorFlow) this is a
  single `cat_file` request: opening the file instead goes through gcsfs's
  default read-ahead cache, whose background prefetcher deadlocks when
  grain's reader threads open bucket files concurrently.
  """
  file = epath.Path(path)
  fs_of = getattr(getattr(file, "_backend", None), "fs", None)
  if is_url(path) and callable(fs_of):
    return fs_of(os.fspath(path)).cat_file(os.fspath(path))
  return file.read_bytes()

