"""DAVIS palette PNGs: object-id maps stored as palette indices.

DAVIS annotations and result files are single-channel PNGs whose pixel values
are object ids (0 background, 1..n objects, 255 void in annotations), stored
with the PASCAL VOC colour map as palette so they look right in a viewer.
This is the package's only reader and writer of them, shared by the DAVIS
sources, the synthetic video generator, the J&F scorer, the in-training
evaluator and predict. Writes are atomic (`formats.atomic`).
"""

from __future__ import annotations

import io
import os
from typing import IO

import numpy as np
from etils import epath
from PIL import Image

from pix2seq_d_jax.formats import atomic, coco_panoptic

# Largest id a palette PNG can hold.
MAX_ID = 255


def _pascal_voc_palette() -> np.ndarray:
  # Bit i of each of r, g, b comes from bits 3k, 3k+1, 3k+2 of the index,
  # most significant first (the PASCAL VOC devkit's labelcolormap).
  index = np.arange(256)
  cmap = np.zeros((256, 3), np.int64)
  for j in range(8):
    for channel in range(3):
      cmap[:, channel] |= ((index >> (3 * j + channel)) & 1) << (7 - j)
  return cmap.astype(np.uint8)


_PALETTE = _pascal_voc_palette()


def davis_palette() -> np.ndarray:
  """The DAVIS PNG palette (PASCAL VOC colour map), uint8 [256, 3]."""
  return _PALETTE.copy()


def read_palette_png(
    source: atomic.PathLike | IO[bytes], name: str | None = None
) -> np.ndarray:
  """Reads a DAVIS annotation or result PNG as its id map.

  Args:
    source: a path, or a binary file object (e.g. PNG bytes from a TFDS
      record wrapped in `io.BytesIO`).
    name: how errors name the file; defaults to the path.

  Returns:
    [h, w] ids as stored, not colours: uint8 for palette, grayscale and
    1-bit PNGs (wider integers for 16/32-bit grayscale).

  Raises:
    FileNotFoundError: `source` is a path that does not exist.
    ValueError: the data is not a decodable single-channel integer image
      (e.g. an RGB PNG); the message names the file.
  """
  if isinstance(source, str | os.PathLike):
    path = epath.Path(source)
    name = name or os.fspath(source)
    if not path.is_file():
      raise FileNotFoundError(f'DAVIS PNG not found: {name}')
    with path.open('rb') as f:
      return _decode(f, name)
  return _decode(source, name or 'DAVIS PNG')


def _decode(f: IO[bytes], name: str) -> np.ndarray:
  try:
    with Image.open(f) as im:
      mode = im.mode
      # np.array forces the full decode, so truncated files fail here.
      ids = np.array(im)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f'Cannot decode PNG {name}: {e}') from e
  if ids.dtype == bool:
    ids = ids.astype(np.uint8)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(
        f'{name}: expected a single-channel palette or grayscale PNG of ids, '
        f'got mode {mode!r} ({ids.dtype} {ids.shape}).'
    )
  return ids


def write_palette_png(path: atomic.PathLike, ids: np.ndarray) -> None:
  """Writes an id map as a DAVIS palette PNG, atomically.

  Args:
    path: destination PNG; missing parent folders are created.
    ids: integer [h, w] ids in [0, 255] (0 background, 1..n objects).

  Raises:
    ValueError: `ids` is not an integer [h, w] map within [0, 255].
  """
  ids = np.asarray(ids)
  if ids.dtype == bool:
    ids = ids.astype(np.uint8)
  ids = coco_panoptic.check_id_map(ids, f'write_palette_png({path})',
                                   max_id=MAX_ID)
  img = Image.fromarray(ids.astype(np.uint8))
  img.putpalette(_PALETTE.ravel().tolist())
  buffer = io.BytesIO()
  img.save(buffer, format='PNG')
  atomic.write_bytes(path, buffer.getvalue())
