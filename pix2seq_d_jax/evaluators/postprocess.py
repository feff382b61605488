"""Turns decoded (semantic, instance) masks into panoptic segments.

The diffusion decoder outputs a semantic class and an instance id per pixel,
which need not agree: one instance id can cover pixels of several thing
classes, stuff pixels carry arbitrary instance ids and tiny fragments are
noise. `masks_to_panoptic` builds segments by majority vote under either
`stuff_identity` convention: 'random' (the reference: every id, stuff
included, takes the class most of its pixels have) or 'zero' (stuff classes
form one segment each, ids vote among thing pixels); segments smaller than
`min_pixels` become void. The result is a COCO-style id map plus
`segments_info`. `resize_to_original` maps mask-resolution predictions (with
padding) to the original image size as the reference does (upsample to the
padded input, crop the content, resize), `sequence_to_original` a video
sequence's (semantic, instance) masks; `valid_mask_size` is the mask pixels
that cover the content. numpy only.
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
  stuff_identity: str = config_lib.STUFF_IDENTITY_DEFAULT,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Builds panoptic segments from per-pixel class and instance predictions.

  Class 0 is void. `stuff_identity` selects the rules of the training
  target's convention:

  'random' (the reference's majority vote): every nonzero id is one
  segment that takes the class most of its pixels have, counting all its
  pixels (void and stuff included; ties go to the smallest class index); an
  id whose winner is void or that has fewer than `min_pixels` pixels is
  void, and so is id 0 (the target's void and crowd id). A stuff region
  split over two ids is two segments.

  'zero': pixels of thing classes are grouped by nonzero instance id; each
  instance takes the thing class most of those pixels have (ties: the
  smallest class); thing pixels with instance 0 are void. Pixels of a stuff
  class form one segment per class whatever their instance id. Segments
  with fewer than `min_pixels` pixels become void.

  Args:
    semantic: int [h, w] contiguous class indices in [0, num_classes).
    instance: int [h, w] instance ids (>= 0).
    is_thing: bool [num_classes]; entry 0 (void) is ignored.
    min_pixels: the smallest segment kept.
    stuff_identity: 'random' or 'zero', as above.

  Returns:
    (segment_ids int32 [h, w] with 0 = void, segments_info). Ids are 1..n:
    'random' in instance id order; 'zero' stuff segments first by class
    index, then instances by instance id. Each info is {'id', 'category_id'
    (contiguous class index), 'area', 'bbox' [x, y, w, h] (COCO, inclusive
    pixel extent), 'iscrowd': 0, 'isthing'}.

  Raises:
    ValueError: on shape or dtype mismatches, classes outside is_thing or an
      unknown stuff_identity.
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
  if stuff_identity not in config_lib.STUFF_IDENTITIES:
    raise ValueError(
      f"stuff_identity={stuff_identity!r}: expected one of "
      f"{list(config_lib.STUFF_IDENTITIES)} (config.input.stuff_identity)"
    )
  if stuff_identity == "random":
    segment_ids, categories = _vote_every_identity(
      semantic, instance, num_classes, min_pixels)
    isthing = [bool(is_thing[c]) for c in categories]
  else:
    segment_ids, categories, isthing = _vote_thing_identities(
      semantic, instance, is_thing, min_pixels)
  return segment_ids, _segments_info(segment_ids, categories, isthing)


def _vote_counts(
  semantic: np.ndarray, instance: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids present, per-pixel index into them, votes int [n, num_classes])."""
  ids, inverse = np.unique(instance, return_inverse=True)
  inverse = inverse.reshape(instance.shape)
  votes = np.bincount(
    (inverse * num_classes + semantic).ravel(),
    minlength=ids.size * num_classes,
  ).reshape(ids.size, num_classes)
  return ids, inverse, votes


def _vote_every_identity(
  semantic: np.ndarray, instance: np.ndarray, num_classes: int,
  min_pixels: int,
) -> tuple[np.ndarray, list[int]]:
  """'random': one segment per nonzero id, its class by majority vote."""
  ids, inverse, votes = _vote_counts(semantic, instance, num_classes)
  # argmax returns the first maximum, i.e. the smallest class on ties.
  winners = votes.argmax(axis=1)
  keep = (ids != 0) & (winners != 0) & (votes.sum(axis=1) >= min_pixels)
  lut = np.zeros(ids.size, np.int32)
  lut[keep] = np.arange(1, int(keep.sum()) + 1)
  return lut[inverse], [int(c) for c in winners[keep]]


def _vote_thing_identities(
  semantic: np.ndarray, instance: np.ndarray, is_thing: np.ndarray,
  min_pixels: int,
) -> tuple[np.ndarray, list[int], list[bool]]:
  """'zero': one segment per stuff class, thing ids vote among things."""
  num_classes = is_thing.size
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

  ids, inverse, votes = _vote_counts(
    semantic[instance_px], instance[instance_px], num_classes)
  winners = votes.argmax(axis=1)
  sizes = votes.sum(axis=1)
  instance_lut = np.zeros(ids.size, np.int32)
  for k in range(ids.size):
    if sizes[k] >= min_pixels:
      categories.append(int(winners[k]))
      isthing.append(True)
      instance_lut[k] = len(categories)
  segment_ids[instance_px] = instance_lut[inverse]
  return segment_ids, categories, isthing


def _segments_info(
  segment_ids: np.ndarray, categories: list[int], isthing: list[bool]
) -> list[dict[str, Any]]:
  """COCO-style info (area, inclusive bbox) of segments 1..len(categories)."""
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
  return [
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
      "isthing": bool(isthing[i - 1]),
    }
    for i in range(1, n + 1)
  ]


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


def original_index(
  mask_size: Sequence[int],
  valid_size: Sequence[int],
  image_size: int | Sequence[int],
  orig_size: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
  """Mask rows and columns each original pixel reads (the reference chain).

  The reference upsamples the mask prediction to the padded (H, W) image
  size (nearest), crops the (h, w) = `valid_size` content and resizes that
  to the original size (nearest). Composing the three nearest index maps
  gives the same pixels without building the image-size map. For a content
  size that is a multiple of the stride this equals cropping
  ceil(valid / stride) mask pixels and resizing them once; for others up to
  half a mask pixel of the last row/column moves.

  Args:
    mask_size: (h', w') of the (padded) mask prediction.
    valid_size: (h, w) of the content inside the padded input image.
    image_size: (H, W) of the padded input image, or an int for a square.
    orig_size: (H0, W0) of the original image.

  Returns:
    (rows int [H0], cols int [W0]) indices into the mask prediction.

  Raises:
    ValueError: on sizes that are not positive or content outside the image.
  """
  image = config_lib.size_hw(image_size, "image_size")
  out = []
  for axis, m, v, s, o in zip(("height", "width"), mask_size, valid_size,
                              image, orig_size, strict=True):
    m, v, s, o = int(m), int(v), int(s), int(o)
    if not (m > 0 and 0 < v <= s and o > 0):
      raise ValueError(
        f"original_index: need mask > 0, 0 < valid <= image and orig > 0 on "
        f"the {axis}, got mask {m}, valid {v}, image {s}, orig {o}")
    upsampled = preprocess.nearest_index(m, s)  # mask -> padded image
    out.append(upsampled[:v][preprocess.nearest_index(v, o)])
  return out[0], out[1]


def resize_to_original(
  labels: np.ndarray,
  *,
  valid_size: Sequence[int],
  image_size: int | Sequence[int],
  orig_size: Sequence[int],
) -> np.ndarray:
  """A mask-resolution label map at the original image size.

  The reference chain (`original_index`): upsample to the padded image
  size, crop the unpadded content, resize to the original size, all nearest
  neighbour. Images are resized keeping their aspect ratio and padded at
  the bottom and right, so the content is the top-left corner.

  Args:
    labels: [h', w'] or [h', w', c] mask-resolution labels (with padding).
    valid_size: (h, w) of the content inside the padded input image.
    image_size: (H, W) of the padded input image, or an int for a square.
    orig_size: (H0, W0) of the original image.

  Returns:
    [H0, W0] (or [H0, W0, c]) labels of labels' dtype.
  """
  labels = np.asarray(labels)
  rows, cols = original_index(labels.shape[:2], valid_size, image_size,
                              orig_size)
  return labels[rows[:, None], cols[None, :]]


def panoptic_at_original(
  semantic: np.ndarray,
  instance: np.ndarray,
  *,
  valid_size: Sequence[int],
  image_size: int | Sequence[int],
  orig_size: Sequence[int],
  is_thing: Sequence[bool] | np.ndarray,
  min_pixels: int = 40,
  stuff_identity: str = config_lib.STUFF_IDENTITY_DEFAULT,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Panoptic segments of a mask-resolution prediction at the image's size.

  As the reference orders it: the class and instance maps are brought to
  the original image size first (`resize_to_original`), then the segments
  are built there (`masks_to_panoptic`), so `min_pixels` counts original
  pixels: a segment of 30 mask pixels that covers 42 original ones is kept
  with `min_pixels=40`.

  Args:
    semantic, instance: int [h', w'] predictions (with padding).
    valid_size, image_size, orig_size: as in `resize_to_original`.
    is_thing: bool [num_classes].
    min_pixels: the smallest segment kept, in original pixels.
    stuff_identity: 'random' or 'zero' (`masks_to_panoptic`).

  Returns:
    `masks_to_panoptic`'s (segment ids int32 [H0, W0], segments info).
  """
  both = resize_to_original(
    np.stack([np.asarray(semantic), np.asarray(instance)], -1),
    valid_size=valid_size, image_size=image_size, orig_size=orig_size)
  return masks_to_panoptic(both[..., 0], both[..., 1], is_thing=is_thing,
                           min_pixels=min_pixels,
                           stuff_identity=stuff_identity)


def sequence_to_original(
  semantic: np.ndarray,
  instance: np.ndarray,
  *,
  valid_size: Sequence[int],
  orig_size: Sequence[int],
  image_size: int | Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
  """One sequence's mask-size predictions at its frames' size.

  Every frame goes through the image chain (`original_index`: upsample to
  the padded input, crop the content, resize to the frame, nearest).

  Args:
    semantic, instance: int [T, h', w'] predictions of the real frames.
    valid_size: (h, w) of the resized frame inside the padded image.
    orig_size: (H, W) of the frames.
    image_size: the padded input's (height, width), or an int (a square).

  Returns:
    (semantic, instance), [T, H, W] each, of the inputs' dtypes.
  """
  semantic, instance = np.asarray(semantic), np.asarray(instance)
  rows, cols = original_index(semantic.shape[-2:], valid_size, image_size,
                              orig_size)
  index = (slice(None), rows[:, None], cols[None, :])
  return semantic[index], instance[index]


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
