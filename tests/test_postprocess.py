"""Tests of panoptic post-processing and the resize-to-original helpers."""

import numpy as np
import pytest
from PIL import Image

from pix2seq_d_jax.evaluators import postprocess

# Classes: 0 void, 1 and 2 things, 3 and 4 stuff.
IS_THING = [False, True, True, False, False]


def test_majority_vote_min_pixels_and_stuff_merge():
  semantic = np.array(
    [
      [1, 1, 2, 3, 3, 3],
      [1, 2, 2, 3, 3, 3],
      [1, 1, 0, 4, 4, 0],
      [2, 2, 1, 4, 1, 0],
    ]
  )
  instance = np.array(
    [
      [5, 5, 5, 9, 9, 0],
      [5, 7, 7, 0, 0, 0],
      [0, 5, 0, 0, 0, 0],
      [7, 7, 5, 0, 0, 0],
    ]
  )
  ids, info = postprocess.masks_to_panoptic(
    semantic, instance, is_thing=IS_THING, min_pixels=4
  )
  # Stuff 3 (6 px, instance ids ignored) -> 1; stuff 4 (3 px) dropped;
  # instance 5 votes 5:1 for class 1 -> 2; instance 7 (4 px, class 2) -> 3;
  # thing pixels with instance 0 are void.
  expected = np.array(
    [
      [2, 2, 2, 1, 1, 1],
      [2, 3, 3, 1, 1, 1],
      [0, 2, 0, 0, 0, 0],
      [3, 3, 2, 0, 0, 0],
    ]
  )
  np.testing.assert_array_equal(ids, expected)
  assert ids.dtype == np.int32
  assert info == [
    {"id": 1, "category_id": 3, "area": 6, "bbox": [3, 0, 3, 2],
     "iscrowd": 0, "isthing": False},
    {"id": 2, "category_id": 1, "area": 6, "bbox": [0, 0, 3, 4],
     "iscrowd": 0, "isthing": True},
    {"id": 3, "category_id": 2, "area": 4, "bbox": [0, 1, 3, 3],
     "iscrowd": 0, "isthing": True},
  ]  # fmt: skip
  # With min_pixels=5 instance 7 (4 px) disappears as well.
  ids5, info5 = postprocess.masks_to_panoptic(
    semantic, instance, is_thing=IS_THING, min_pixels=5
  )
  np.testing.assert_array_equal(ids5, np.where(expected == 3, 0, expected))
  assert [s["id"] for s in info5] == [1, 2]


def test_vote_tie_goes_to_smallest_class_and_areas_sum():
  semantic = np.array([[2, 2, 1, 1, 0, 4]])
  instance = np.array([[3, 3, 3, 3, 3, 3]])
  ids, info = postprocess.masks_to_panoptic(
    semantic, instance, is_thing=IS_THING, min_pixels=1
  )
  np.testing.assert_array_equal(ids, [[2, 2, 2, 2, 0, 1]])
  assert [(s["category_id"], s["isthing"]) for s in info] == [
    (4, False),
    (1, True),
  ]
  assert sum(s["area"] for s in info) == np.count_nonzero(ids)


def test_bad_class_raises():
  with pytest.raises(ValueError, match="class 5 >= num_classes 5"):
    postprocess.masks_to_panoptic(
      np.array([[5]]), np.array([[0]]), is_thing=IS_THING
    )


def test_resize_nearest_hand_cases():
  labels = np.array([[1, 2, 3], [4, 5, 6]])
  np.testing.assert_array_equal(
    postprocess.resize_nearest(labels, (4, 6)),
    np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1),
  )
  big = np.arange(16).reshape(4, 4)
  # Pixel-centre sampling takes rows/cols 1 and 3.
  np.testing.assert_array_equal(
    postprocess.resize_nearest(big, (2, 2)), [[5, 7], [13, 15]]
  )
  stacked = np.stack([labels, labels * 10], -1)
  out = postprocess.resize_nearest(stacked, (3, 5))
  np.testing.assert_array_equal(out[..., 1], out[..., 0] * 10)


@pytest.mark.parametrize(("src", "dst"), [((5, 7), (3, 11)), ((6, 4), (13, 9))])
def test_resize_nearest_matches_pil(src, dst):
  labels = np.arange(src[0] * src[1], dtype=np.int32).reshape(src)
  pil = Image.fromarray(labels).resize(
    (dst[1], dst[0]), Image.Resampling.NEAREST
  )
  np.testing.assert_array_equal(
    postprocess.resize_nearest(labels, dst), np.asarray(pil)
  )


def test_crop_and_resize_to_original():
  labels = np.array(
    [[1, 2, 3, 0], [4, 5, 6, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.int32
  )
  out = postprocess.crop_and_resize_to_original(labels, (2, 3), (4, 6))
  np.testing.assert_array_equal(
    out, np.repeat(np.repeat(labels[:2, :3], 2, axis=0), 2, axis=1)
  )
  assert out.dtype == np.int32
  with pytest.raises(ValueError, match="valid_size_in_mask"):
    postprocess.crop_and_resize_to_original(labels, (5, 3), (4, 6))
