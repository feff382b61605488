"""COCO panoptic file format: RGB<->id encoding and PNG/JSON/image I/O.

COCO panoptic stores one PNG per image whose RGB colour encodes the segment id
(`id = R + 256 * G + 256**2 * B`, 0 = void) and one JSON per split that lists
images, per-image `segments_info` and categories. This is the package's only
codec of that format: the COCO reader, the synthetic generator, the
in-training evaluator, the PQ command line and predict all decode ground truth
the same way, exactly as panopticapi does (`rgb_to_id` equals its `rgb2id`;
`read_panoptic_png` decodes the stored pixels like its `pq_compute`, without
colour conversion). Every reading error names the file and what was expected;
every writer is atomic (`formats.atomic`), so a crash never leaves a truncated
file behind. Paths may be local or any URL `etils.epath` understands.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
from etils import epath
from PIL import Image

from pix2seq_d_jax.formats import atomic, paths

PathLike = atomic.PathLike

# Largest id an RGB triple can encode.
MAX_SEGMENT_ID = 256**3 - 1

_REQUIRED_TOP_KEYS = ('images', 'annotations', 'categories')
_REQUIRED_ENTRY_KEYS = {
    'images': ('id', 'file_name'),
    'annotations': ('image_id', 'file_name', 'segments_info'),
    'categories': ('id', 'name', 'isthing'),
}
_REQUIRED_SEGMENT_KEYS = ('id', 'category_id')
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
  """Decodes COCO panoptic colours into segment ids, as panopticapi's rgb2id.

  panopticapi's `rgb2id` reads channels 0, 1 and 2 of an [h, w, c] array
  (so an alpha channel is ignored) and, for uint8 input, computes in int32;
  the ids are below 256**3, so int32 holds every one of them and the values
  equal panopticapi's for any integer input dtype (its `pq_compute` passes
  uint32 pixels).

  Args:
    rgb: integer [h, w, c] pixels with c >= 3 (RGB, or RGBA from a PNG).

  Returns:
    int32 [h, w] segment ids, `R + 256 * G + 256**2 * B` (0 = void).

  Raises:
    ValueError: if `rgb` is not an integer [h, w, c >= 3] array (panopticapi
      has no meaning for other shapes either).
  """
  rgb = np.asarray(rgb)
  if (
      rgb.ndim != 3
      or rgb.shape[-1] < 3
      or not np.issubdtype(rgb.dtype, np.integer)
  ):
    raise ValueError(
        'rgb_to_id: expected integer colours [h, w, 3] (or [h, w, 4]), got '
        f'{rgb.dtype} {rgb.shape}.'
    )
  rgb = rgb[..., :3].astype(np.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def check_id_map(
    ids: np.ndarray, what: str, max_id: int = MAX_SEGMENT_ID
) -> np.ndarray:
  """Returns `ids` as an array after checking it is an id map.

  Args:
    ids: segment ids, integer [h, w].
    what: names the map in the error (e.g. the file).
    max_id: the largest allowed id (an RGB PNG holds up to 256**3 - 1).

  Raises:
    ValueError: not 2-D, not integer, or an id outside [0, max_id].
  """
  ids = np.asarray(ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(
        f'{what}: expected an integer [h, w] id map, got {ids.dtype} '
        f'{ids.shape}'
    )
  if ids.size and (ids.min() < 0 or ids.max() > max_id):
    raise ValueError(
        f'{what}: ids must lie in [0, {max_id}], got range '
        f'[{ids.min()}, {ids.max()}]'
    )
  return ids


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
  """Encodes segment ids as COCO panoptic RGB colours (inverse of rgb_to_id).

  Args:
    ids: integer [h, w] segment ids in [0, 256**3).

  Returns:
    uint8 [h, w, 3] colours.

  Raises:
    ValueError: if `ids` is not 2-D, not integer, or out of range.
  """
  ids = check_id_map(ids, 'id_to_rgb')
  ids = ids.astype(np.int64)
  rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1)
  return rgb.astype(np.uint8)


def _decode(f: IO[bytes], what: str, name: str, mode: str | None):
  try:
    with Image.open(f) as im:
      # np.asarray forces the full decode, so truncated files fail here.
      return np.asarray(im.convert(mode) if mode else im)
  except _DECODE_ERRORS as e:
    raise ValueError(f'Cannot decode {what} {name}: {e}') from e


def _read_pixels(
    source: PathLike | IO[bytes],
    name: str | None,
    *,
    missing: str,
    what: str,
    mode: str | None,
) -> tuple[np.ndarray, str]:
  """Decodes a file or file object fully; returns pixels and its name."""
  if not isinstance(source, str | os.PathLike):
    name = name or what
    return _decode(source, what, name, mode), name
  name = name or os.fspath(source)
  path = epath.Path(source)
  if not path.is_file():
    raise FileNotFoundError(f'{missing} not found: {name}')
  # One read of the whole (small) file, then decode from memory.
  return _decode(io.BytesIO(paths.read_bytes(source)), what, name,
                 mode), name


def read_rgb_image(
    source: PathLike | IO[bytes], name: str | None = None
) -> np.ndarray:
  """Reads an image file (JPEG, PNG, ...) as RGB.

  Grayscale, palette and RGBA images are converted to RGB, as COCO contains a
  few grayscale JPEGs.

  Args:
    source: image file, or a binary file object (e.g. encoded bytes from a
      TFDS record in `io.BytesIO`).
    name: how errors name the image; defaults to the path.

  Returns:
    uint8 [h, w, 3].

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if the file cannot be decoded.
  """
  pixels, _ = _read_pixels(
      source, name, missing='Image file', what='image', mode='RGB'
  )
  return pixels


def read_panoptic_png(
    source: PathLike | IO[bytes], name: str | None = None
) -> np.ndarray:
  """Reads a COCO panoptic PNG into segment ids, as panopticapi does.

  The stored pixels are decoded without colour conversion (panopticapi's
  `np.array(Image.open(path), dtype=np.uint32)`) and passed to `rgb_to_id`;
  an alpha channel is ignored.

  Args:
    source: PNG file written in the RGB id encoding, or a binary file object.
    name: how errors name the PNG; defaults to the path.

  Returns:
    int32 [h, w] segment ids.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if the file cannot be decoded, or is not an RGB(A) image
      (e.g. a palette or grayscale PNG, which panopticapi cannot score).
  """
  pixels, name = _read_pixels(
      source, name, missing='Panoptic PNG', what='panoptic PNG', mode=None
  )
  try:
    return rgb_to_id(pixels)
  except ValueError as e:
    raise ValueError(f'Panoptic PNG {name}: {e}') from e


def encode_image(image: np.ndarray, fmt: str = 'PNG') -> bytes:
  """Encodes uint8 [h, w] or [h, w, 3] pixels as PNG or JPEG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt)
  return buffer.getvalue()


def write_rgb_image(path: PathLike, image: np.ndarray) -> None:
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
  ext = epath.Path(path).suffix.lower()
  fmt = {'.jpg': 'JPEG', '.jpeg': 'JPEG'}.get(ext, 'PNG')
  atomic.write_bytes(path, encode_image(image, fmt))


def write_panoptic_png(path: PathLike, ids: np.ndarray) -> None:
  """Writes segment ids as a COCO panoptic PNG, atomically.

  Args:
    path: destination PNG.
    ids: integer [h, w] segment ids in [0, 256**3).
  """
  write_rgb_image(path, id_to_rgb(ids))


def write_panoptic_json(
    path: PathLike,
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
  atomic.write_json(path, content)


def load_panoptic_json(path: PathLike) -> dict[str, Any]:
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
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f'Panoptic JSON not found: {path}')
  try:
    content = json.loads(epath.Path(path).read_bytes())
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
