"""COCO panoptic file format: RGB<->id encoding and PNG/JSON/image I/O.

COCO panoptic stores one PNG per image whose RGB colour encodes the segment id
(`id = R + 256 * G + 256**2 * B`, 0 = void) and one JSON per split that lists
images, per-image `segments_info` and categories. These helpers read and write
exactly that format, so the COCO reader, the synthetic generator and the
evaluator share one implementation; every reading error names the file and what
was expected, and every writer is atomic (temporary file + rename) so a crash
never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# Largest id an RGB triple can encode.
MAX_SEGMENT_ID = 256**3 - 1

_REQUIRED_TOP_KEYS = ('images', 'annotations', 'categories')
_REQUIRED_ENTRY_KEYS = {
    'images': ('id', 'file_name'),
    'annotations': ('image_id', 'file_name', 'segments_info'),
    'categories': ('id', 'name', 'isthing'),
}
_REQUIRED_SEGMENT_KEYS = ('id', 'category_id')


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
  """Decodes a COCO panoptic RGB map into segment ids.

  Args:
    rgb: uint8 [h, w, 3] panoptic colours.

  Returns:
    int32 [h, w] segment ids, `R + 256 * G + 256**2 * B` (0 = void).

  Raises:
    ValueError: if `rgb` is not [h, w, 3].
  """
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f'rgb_to_id: expected rgb [h, w, 3], got {rgb.shape}.')
  rgb = rgb.astype(np.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
  """Encodes segment ids as COCO panoptic RGB colours (inverse of rgb_to_id).

  Args:
    ids: integer [h, w] segment ids in [0, 256**3).

  Returns:
    uint8 [h, w, 3] colours.

  Raises:
    ValueError: if `ids` is not 2-D, not integer, or out of range.
  """
  ids = np.asarray(ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(
        f'id_to_rgb: expected integer ids [h, w], got {ids.dtype} {ids.shape}.'
    )
  if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
    raise ValueError(
        f'id_to_rgb: ids must be in [0, {MAX_SEGMENT_ID}], got range '
        f'[{ids.min()}, {ids.max()}].'
    )
  ids = ids.astype(np.int64)
  rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1)
  return rgb.astype(np.uint8)


def read_rgb_image(path: str) -> np.ndarray:
  """Reads an image file (JPEG, PNG, ...) as RGB.

  Grayscale, palette and RGBA images are converted to RGB, as COCO contains a
  few grayscale JPEGs.

  Args:
    path: image file.

  Returns:
    uint8 [h, w, 3].

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if the file cannot be decoded.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Image file not found: {path}')
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f'Cannot decode image {path}: {e}') from e


def read_panoptic_png(path: str) -> np.ndarray:
  """Reads a COCO panoptic PNG into segment ids.

  Args:
    path: PNG file written in the RGB id encoding.

  Returns:
    int32 [h, w] segment ids.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if the file cannot be decoded as an image.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Panoptic PNG not found: {path}')
  try:
    with Image.open(path) as im:
      # convert() forces the full decode, so truncated files fail here.
      rgb = np.asarray(im.convert('RGB'), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f'Cannot decode panoptic PNG {path}: {e}') from e
  return rgb_to_id(rgb)


def _atomic_write_bytes(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_rgb_image(path: str, image: np.ndarray) -> None:
  """Writes an RGB image atomically; the format follows the file extension.

  Args:
    path: destination (`.png` is lossless; `.jpg` is lossy).
    image: uint8 [h, w, 3].

  Raises:
    ValueError: if `image` is not uint8 [h, w, 3].
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f'write_rgb_image({path}): expected uint8 [h, w, 3], got '
        f'{image.dtype} {image.shape}.'
    )
  ext = os.path.splitext(path)[1].lower()
  fmt = {'.jpg': 'JPEG', '.jpeg': 'JPEG'}.get(ext, 'PNG')
  tmp = f'{path}.tmp-{os.getpid()}'
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image, 'RGB').save(tmp, format=fmt)
  os.replace(tmp, path)


def write_panoptic_png(path: str, ids: np.ndarray) -> None:
  """Writes segment ids as a COCO panoptic PNG, atomically.

  Args:
    path: destination PNG.
    ids: integer [h, w] segment ids in [0, 256**3).
  """
  write_rgb_image(path, id_to_rgb(ids))


def write_panoptic_json(
    path: str,
    images: Sequence[dict[str, Any]],
    annotations: Sequence[dict[str, Any]],
    categories: Sequence[dict[str, Any]],
) -> None:
  """Writes a COCO panoptic JSON atomically (temporary file + rename).

  Args:
    path: destination JSON.
    images: entries `{id, file_name, height, width}`.
    annotations: entries `{image_id, file_name, segments_info: [{id,
      category_id, area, bbox, iscrowd}]}`.
    categories: entries `{id, name, supercategory, isthing, color}`.
  """
  content = {
      'images': list(images),
      'annotations': list(annotations),
      'categories': list(categories),
  }
  _atomic_write_bytes(path, json.dumps(content).encode('utf-8'))


def load_panoptic_json(path: str) -> dict[str, Any]:
  """Loads and validates a COCO panoptic JSON.

  Args:
    path: the split's `panoptic_{split}2017.json`.

  Returns:
    The parsed dict with keys `images`, `annotations` and `categories`.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if it is not valid JSON or lacks a required key (the message
      names the file, the field and, for list entries, their position).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Panoptic JSON not found: {path}')
  try:
    with open(path, encoding='utf-8') as f:
      content = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'Panoptic JSON {path} is not valid JSON: {e}') from e
  if not isinstance(content, dict):
    raise ValueError(
        f'Panoptic JSON {path}: expected an object at top level, got '
        f'{type(content).__name__}.'
    )
  for key in _REQUIRED_TOP_KEYS:
    if not isinstance(content.get(key), list):
      raise ValueError(
          f'Panoptic JSON {path}: missing list field {key!r} (expected keys '
          f'{list(_REQUIRED_TOP_KEYS)}).'
      )
    for i, entry in enumerate(content[key]):
      missing = [k for k in _REQUIRED_ENTRY_KEYS[key] if k not in entry]
      if missing:
        raise ValueError(
            f'Panoptic JSON {path}: {key}[{i}] lacks field(s) {missing}.'
        )
  for i, ann in enumerate(content['annotations']):
    for j, seg in enumerate(ann['segments_info']):
      missing = [k for k in _REQUIRED_SEGMENT_KEYS if k not in seg]
      if missing:
        raise ValueError(
            f'Panoptic JSON {path}: annotations[{i}].segments_info[{j}] lacks '
            f'field(s) {missing}.'
        )
  return content
