"""Finding the inputs of prediction: image files, folders, video sequences.

An input is one image file, a folder of images (non-recursive, sorted by
name) or a video: a folder of frames (one sequence, named after the
folder) or a folder of such folders (e.g. DAVIS `JPEGImages/480p/`, one
sequence per sub-folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from etils import epath

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"
)
# Output folders next to the sequence folders of a video prediction.
VIDEO_EXTRAS = ("overlays", "trajectories")


def list_images(inputs: str | Sequence[str]) -> list[str]:
  """Expands image files and folders into a list of image files.

  Args:
    inputs: an image file, a folder (its image files, non-recursive, sorted
      by name) or a sequence of those.

  Returns:
    The image paths in order.

  Raises:
    FileNotFoundError: a path does not exist, or no image was found.
  """
  if isinstance(inputs, str | os.PathLike):
    inputs = [inputs]
  paths = []
  for item in inputs:
    item = _expand(item)
    if epath.Path(item).is_dir():
      paths.extend(os.path.join(item, n) for n in _image_names(item))
    elif epath.Path(item).is_file():
      paths.append(item)
    else:
      raise FileNotFoundError(f"--input={item!r}: no such file or folder")
  if not paths:
    raise FileNotFoundError(
        f"--input={list(inputs)}: no image files (extensions "
        f"{', '.join(IMAGE_EXTENSIONS)})"
    )
  return paths


def _expand(path: str | os.PathLike) -> str:
  """`~` expanded; a URL (`gs://...`) kept as is.

  Never normpath or abspath a URL: both turn `gs://b` into `gs:/b`.
  """
  path = os.fspath(path)
  return path if "://" in path else os.path.expanduser(path)


def _image_names(folder: str) -> list[str]:
  return sorted(
      p.name for p in epath.Path(folder).iterdir()
      if not p.name.startswith(".")
      and p.suffix.lower() in IMAGE_EXTENSIONS
      and p.is_file()
  )


def _subfolders(folder: str) -> list[str]:
  return sorted(
      p.name for p in epath.Path(folder).iterdir()
      if not p.name.startswith(".") and p.is_dir()
  )


def is_sequence_root(path: str) -> bool:
  """Whether `path` is a folder of sequence folders (DAVIS JPEGImages/480p).

  True for a folder that holds no image file directly but at least one
  sub-folder that does; the CLI then predicts a video without `--video`.
  """
  path = _expand(path)
  if not epath.Path(path).is_dir() or _image_names(path):
    return False
  return any(_image_names(os.path.join(path, d)) for d in _subfolders(path))


def list_sequences(path: str) -> list[tuple[str, list[str]]]:
  """The sequences of a video input and their frames, in sorted order.

  Args:
    path: a folder of frames (one sequence, named after the folder) or a
      folder of such folders (one sequence per sub-folder that holds
      images; others are skipped).

  Returns:
    (sequence name, frame paths) pairs.

  Raises:
    FileNotFoundError: `path` is not a folder or holds no frames.
    ValueError: a sequence is named like an output folder (overlays,
      trajectories), which would mix results and visualisations.
  """
  path = _expand(path)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(
        f"--input={path!r}: --video expects a folder of frames or a folder "
        "of sequence folders"
    )
  frames = _image_names(path)
  if frames:
    name = epath.Path(path if "://" in path else os.path.abspath(path)).name
    sequences = [(name, [os.path.join(path, n) for n in frames])]
  else:
    sequences = []
    for sub in _subfolders(path):
      names = _image_names(os.path.join(path, sub))
      if names:
        sequences.append((sub, [os.path.join(path, sub, n) for n in names]))
  if not sequences:
    raise FileNotFoundError(
        f"--input={path!r}: no frames (extensions "
        f"{', '.join(IMAGE_EXTENSIONS)}) in the folder or its sub-folders"
    )
  for name, _ in sequences:
    if name in VIDEO_EXTRAS:
      raise ValueError(
          f"--input={path!r}: sequence {name!r} would share its output "
          f"folder with the {name}/ visualisations; rename it"
      )
  return sequences


def output_names(paths: Sequence[str]) -> list[str]:
  """File stems, made unique (`a.jpg` and `a.png` give `a` and `a_1`)."""
  names, seen = [], set()
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = stem, 0
    while name in seen:
      k += 1
      name = f"{stem}_{k}"
    seen.add(name)
    names.append(name)
  return names
