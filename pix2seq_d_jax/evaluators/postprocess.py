"""Turns decoded (semantic, instance) masks into panoptic segments.

The diffusion decoder outputs a semantic class and an instance id per pixel,
which need not agree: one instance id can cover pixels of several thing
classes, stuff pixels carry arbitrary instance ids and tiny fragments are
noise. Following the reference post-processing, every instance takes the
majority thing class of its pixels, stuff classes form one segment each, and
segments smaller than `min_pixels` become void. The result is a COCO-style id
map plus `segments_info`. `valid_mask_size` and
`crop_and_resize_to_original` map mask-resolution predictions (with padding)
back to the original image size for evaluation, `sequence_to_original` a
video sequence's (semantic, instance) masks. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pix2seq_d_jax import config_lib
from pix2seq_d_jax.data import preprocess


def _check_labels(array: np.ndarray, name: str) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(
      f"{name}: expected an integer [h, w] map, got {array.dtype} {array.shape}"
    )
  if array.size and array.min() < 0:
    raise ValueError(f"{name}: values must be >= 0, got min {array.min()}")
  return array.astype(np.int64)


def masks_to_panoptic(
  semantic: np.ndarray,
  instance: np.ndarray,
  *,
  is_thing: Sequence[bool] | np.ndarray,
  min_pixels: int = 40,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Builds panoptic segments from per-pixel class and instance predictions.

  Rules: class 0 is void. Pixels of thing classes are grouped by nonzero
  instance id; each instance takes the thing class most of those pixels have
  (ties go to the smallest class index); thing pixels with instance 0 become
  void. Pixels of a stuff class form one segment per class whatever their
  instance id. Segments with fewer than `min_pixels` pixels become void.

  Args:
    semantic: int [h, w] contiguous class indices in [0, num_classes).
    instance: int [h, w] instance ids (>= 0).
    is_thing: bool [num_classes]; entry 0 (void) is ignored.
    min_pixels: the smallest segment kept.

  Returns:
    (segment_ids int32 [h, w] with 0 = void, segments_info). Ids are 1..n:
    stuff segments first by class index, then instances by instance id.
    Each info is {'id', 'category_id' (contiguous class index), 'area',
    'bbox' [x, y, w, h] (COCO, inclusive pixel extent), 'iscrowd': 0,
    'isthing'}.

  Raises:
    ValueError: on shape or dtype mismatches or classes outside is_thing.
  """
  semantic = _check_labels(semantic, "semantic")
  instance = _check_labels(instance, "instance")
  if semantic.shape != instance.shape:
    raise ValueError(
      f"instance: shape {instance.shape} differs from semantic {semantic.shape}"
    )
  is_thing = np.asarray(is_thing, dtype=bool)
  if is_thing.ndim != 1 or is_thing.size == 0:
    raise ValueError(f"is_thing: expected bool [num_classes], got {is_thing}")
  num_classes = is_thing.size
  if semantic.size and semantic.max() >= num_classes:
    raise ValueError(
      f"semantic: class {semantic.max()} >= num_classes {num_classes} "
      "(len(is_thing))"
    )
  if min_pixels < 0:
    raise ValueError(f"min_pixels: expected >= 0, got {min_pixels}")

  labelled = semantic != 0
  thing_px = labelled & is_thing[semantic]
  stuff_px = labelled & ~is_thing[semantic]
  instance_px = thing_px & (instance > 0)

  segment_ids = np.zeros(semantic.shape, np.int32)
  categories, isthing = [], []

  stuff_counts = np.bincount(semantic[stuff_px], minlength=num_classes)
  stuff_lut = np.zeros(num_classes, np.int32)
  for c in np.flatnonzero(stuff_counts):
    if stuff_counts[c] >= min_pixels:
      categories.append(int(c))
      isthing.append(False)
      stuff_lut[c] = len(categories)
  segment_ids[stuff_px] = stuff_lut[semantic[stuff_px]]

  instance_ids, inverse = np.unique(instance[instance_px], return_inverse=True)
  votes = np.bincount(
    inverse * num_classes + semantic[instance_px],
    minlength=instance_ids.size * num_classes,
  ).reshape(instance_ids.size, num_classes)
  # argmax returns the first maximum, i.e. the smallest class on ties.
  winners = votes.argmax(axis=1)
  sizes = votes.sum(axis=1)
  instance_lut = np.zeros(instance_ids.size, np.int32)
  for k in range(instance_ids.size):
    if sizes[k] >= min_pixels:
      categories.append(int(winners[k]))
      isthing.append(True)
      instance_lut[k] = len(categories)
  segment_ids[instance_px] = instance_lut[inverse]

  n = len(categories)
  ys, xs = np.nonzero(segment_ids)
  ids = segment_ids[ys, xs]
  area = np.bincount(ids, minlength=n + 1)
  x0 = np.full(n + 1, np.iinfo(np.int64).max)
  y0 = np.full(n + 1, np.iinfo(np.int64).max)
  x1 = np.full(n + 1, -1)
  y1 = np.full(n + 1, -1)
  np.minimum.at(x0, ids, xs)
  np.minimum.at(y0, ids, ys)
  np.maximum.at(x1, ids, xs)
  np.maximum.at(y1, ids, ys)
  segments_info = [
    {
      "id": i,
      "category_id": categories[i - 1],
      "area": int(area[i]),
      "bbox": [
        int(x0[i]),
        int(y0[i]),
        int(x1[i] - x0[i] + 1),
        int(y1[i] - y0[i] + 1),
      ],
      "iscrowd": 0,
      "isthing": isthing[i - 1],
    }
    for i in range(1, n + 1)
  ]
  return segment_ids, segments_info


def valid_mask_size(
  valid_size: Sequence[int],
  image_size: int | Sequence[int],
  mask_size: int | Sequence[int],
) -> tuple[int, int]:
  """The mask pixels that cover an image's unpadded content.

  Images are resized into the top-left (h, w) = `valid_size` of the padded
  (H, W) `image_size` and masks are predicted at (h', w') `mask_size`, so on
  each axis the stride is H / h' (W / w') and the valid mask region is
  ceil(valid / stride) = ceil(valid * h' / H) pixels (at least one),
  computed in integers so no rounding can drop a row.

  Args:
    valid_size: (h, w) of the content inside the padded input image.
    image_size: (H, W) of the padded input image, or an int for a square.
    mask_size: (h', w') of the predicted masks, or an int for a square.

  Returns:
    (h, w) in mask pixels, in [1, h'] and [1, w'].

  Raises:
    ValueError: on malformed or non-positive sizes.
  """
  image = config_lib.size_hw(image_size, "image_size")
  mask = config_lib.size_hw(mask_size, "mask_size")
  h, w = (
    min(m, max(1, -(-int(v) * m // s)))
    for v, s, m in zip(valid_size, image, mask, strict=True)
  )
  return h, w


def crop_and_resize_to_original(
  labels: np.ndarray,
  valid_size_in_mask: Sequence[int],
  orig_size: Sequence[int],
) -> np.ndarray:
  """Removes bottom/right padding and resizes to the original image size.

  Images are resized keeping their aspect ratio and padded at the bottom and
  right to the input size, so the valid part of a mask prediction is its
  top-left (h, w) corner.

  Args:
    labels: [h', w'] or [h', w', c] mask-resolution labels.
    valid_size_in_mask: (h, w) of the unpadded region in mask pixels.
    orig_size: (H, W) of the original image.

  Returns:
    [H, W] (or [H, W, c]) labels of labels' dtype.

  Raises:
    ValueError: if the valid region is empty or exceeds the mask.
  """
  labels = np.asarray(labels)
  h, w = (int(s) for s in valid_size_in_mask)
  if not (0 < h <= labels.shape[0] and 0 < w <= labels.shape[1]):
    raise ValueError(
      f"valid_size_in_mask: expected 0 < (h, w) <= {labels.shape[:2]}, got "
      f"{tuple(valid_size_in_mask)}"
    )
  return preprocess.resize_labels(labels[:h, :w], orig_size)


def panoptic_at_original(
  semantic: np.ndarray,
  instance: np.ndarray,
  *,
  valid_size_in_mask: Sequence[int],
  orig_size: Sequence[int],
  is_thing: Sequence[bool] | np.ndarray,
  min_pixels: int = 40,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Panoptic segments of a mask-resolution prediction at the image's size.

  As the reference does: the padding is cropped and the class and instance
  maps are resized to the original image size first (nearest), then the
  segments are built (`masks_to_panoptic`) there, so `min_pixels` counts
  original pixels: a segment of 30 mask pixels that covers 42 original ones
  is kept with `min_pixels=40`.

  Args:
    semantic, instance: int [h', w'] predictions (with padding).
    valid_size_in_mask: (h, w) of the unpadded region (`valid_mask_size`).
    orig_size: (H, W) of the original image.
    is_thing: bool [num_classes].
    min_pixels: the smallest segment kept, in original pixels.

  Returns:
    `masks_to_panoptic`'s (segment ids int32 [H, W], segments info).
  """
  both = crop_and_resize_to_original(
      np.stack([np.asarray(semantic), np.asarray(instance)], -1),
      valid_size_in_mask, orig_size)
  return masks_to_panoptic(both[..., 0], both[..., 1], is_thing=is_thing,
                           min_pixels=min_pixels)


def sequence_to_original(
  semantic: np.ndarray,
  instance: np.ndarray,
  *,
  valid_size: Sequence[int],
  orig_size: Sequence[int],
  image_size: int | Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
  """Crops and resizes one sequence's mask-size predictions to its frames.

  The valid region is the mask pixels that cover any of the `valid_size`
  content (`valid_mask_size`), as for images; the resize is nearest.

  Args:
    semantic, instance: int [T, h', w'] predictions of the real frames.
    valid_size: (h, w) of the resized frame inside the padded image.
    orig_size: (H, W) of the frames.
    image_size: the padded input's (height, width), or an int (a square).

  Returns:
    (semantic, instance), [T, H, W] each, of the inputs' (common) dtype.
  """
  valid = valid_mask_size(valid_size, image_size, semantic.shape[-2:])
  size = tuple(int(v) for v in orig_size)
  # Semantic and instance stacked on a channel axis: one resize per frame.
  both = np.stack([
    crop_and_resize_to_original(np.stack(pair, -1), valid, size)
    for pair in zip(semantic, instance, strict=True)
  ])
  return both[..., 0], both[..., 1]


def recount_segments(
    ids: np.ndarray, segments: list[dict], class_to_category_id: np.ndarray
) -> list[dict]:
  """Areas and boxes after resizing; classes become dataset category ids.

  Segments that the resize made vanish (inputs smaller than the mask) are
  dropped, so every listed segment has pixels.

  Args:
    ids: int [H, W] segment ids after resizing (0 = void).
    segments: `masks_to_panoptic`'s segments (contiguous class indices).
    class_to_category_id: int [num_classes] dataset category id per class.

  Returns:
    COCO `segments_info` entries (plus `isthing`, used by the overlays).
  """
  n = int(ids.max(initial=0)) + 1
  ys, xs = np.nonzero(ids)
  flat = ids[ys, xs]
  area = np.bincount(flat, minlength=n)
  big = np.iinfo(np.int64).max
  x0, y0 = np.full(n, big), np.full(n, big)
  x1, y1 = np.full(n, -1), np.full(n, -1)
  np.minimum.at(x0, flat, xs)
  np.minimum.at(y0, flat, ys)
  np.maximum.at(x1, flat, xs)
  np.maximum.at(y1, flat, ys)
  out = []
  for seg in segments:
    i = int(seg["id"])
    if i >= n or area[i] == 0:
      continue
    out.append({
        "id": i,
        "category_id": int(class_to_category_id[seg["category_id"]]),
        "area": int(area[i]),
        "bbox": [int(x0[i]), int(y0[i]), int(x1[i] - x0[i] + 1),
                 int(y1[i] - y0[i] + 1)],
        "iscrowd": 0,
        "isthing": bool(seg["isthing"]),
    })
  return out
