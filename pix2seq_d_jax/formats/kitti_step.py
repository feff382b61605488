"""KITTI-STEP panoptic PNGs: semantic train id and track id in RGB.

STEP ground truth and submissions store one RGB PNG per frame: R is the
semantic train id (255 = void) and `G * 256 + B` the track id. This is the
package's only codec of that format, shared by the KITTI-STEP source and the
STQ scorer. Writes are atomic (`formats.atomic`).
"""

from __future__ import annotations

import numpy as np
from etils import epath
from PIL import Image

from pix2seq_d_jax.formats import atomic, coco_panoptic

MAX_TRAIN_ID = 255
MAX_TRACK_ID = 256**2 - 1


def decode_step_panoptic(
    rgb: np.ndarray, path: str = 'panoptic map'
) -> tuple[np.ndarray, np.ndarray]:
  """Splits a STEP panoptic PNG's pixels into train ids and track ids.

  Args:
    rgb: uint8 [h, w, 3] (or [h, w, 4], alpha ignored) pixels.
    path: named in errors.

  Returns:
    `(train_ids, track_ids)`, int32 [h, w] each: R and G * 256 + B.

  Raises:
    ValueError: if the pixels are not RGB(A).
  """
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
    raise ValueError(
        f'{path}: expected an RGB panoptic map [h, w, 3], got shape '
        f'{rgb.shape}.'
    )
  rgb = rgb[..., :3].astype(np.int32)
  return rgb[..., 0], rgb[..., 1] * 256 + rgb[..., 2]


def read_step_png(path: atomic.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads a STEP panoptic PNG as `(train_ids, track_ids)`, int32 [h, w].

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if it cannot be decoded or is not RGB.
  """
  file = epath.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f'Panoptic map not found: {path}')
  try:
    with file.open('rb') as f, Image.open(f) as im:
      pixels = np.asarray(im)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f'Cannot decode panoptic map {path}: {e}') from e
  return decode_step_panoptic(pixels, str(path))


def write_step_png(
    path: atomic.PathLike, train_ids: np.ndarray, track_ids: np.ndarray
) -> None:
  """Writes a STEP panoptic PNG (the format of ground truth and submissions).

  Args:
    path: output file; written to a temporary name, then renamed.
    train_ids: integer [h, w] in [0, 255] (255 = void).
    track_ids: integer [h, w] in [0, 65535].

  Raises:
    ValueError: on a shape mismatch or values out of range.
  """
  train_ids, track_ids = np.asarray(train_ids), np.asarray(track_ids)
  if train_ids.ndim != 2 or train_ids.shape != track_ids.shape:
    raise ValueError(
        f'{path}: expected train_ids and track_ids of one [h, w] shape, got '
        f'{train_ids.shape} and {track_ids.shape}.'
    )
  for name, x, top in (('train_ids', train_ids, MAX_TRAIN_ID),
                       ('track_ids', track_ids, MAX_TRACK_ID)):
    if x.size and (x.min() < 0 or x.max() > top):
      raise ValueError(
          f'{path}: {name} must be in [0, {top}], got [{x.min()}, {x.max()}].'
      )
  track_ids = track_ids.astype(np.int64)
  rgb = np.stack([train_ids, track_ids // 256, track_ids % 256], -1)
  atomic.write_bytes(path, coco_panoptic.encode_image(rgb.astype(np.uint8)))
