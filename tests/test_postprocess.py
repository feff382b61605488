"""Tests of panoptic post-processing and the resize-to-original helpers."""

import numpy as np
import pytest

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


def test_valid_mask_size_hand_cases():
  # Stride 4: 10 content pixels touch ceil(10 / 4) = 3 mask pixels.
  assert postprocess.valid_mask_size((10, 64), 64, 16) == (3, 16)
  # Stride 640 / 160 = 4 exactly; 427 -> ceil(106.75) = 107.
  assert postprocess.valid_mask_size((480, 427), 640, 160) == (120, 107)
  # A non-integer stride (96 / 40 = 2.4): 12 / 2.4 = 5 exactly, no rounding
  # up to 6; 13 / 2.4 = 5.42 -> 6; empty content still keeps one pixel.
  assert postprocess.valid_mask_size((12, 13), 96, 40) == (5, 6)
  assert postprocess.valid_mask_size((0, 96), 96, 40) == (1, 40)
  with pytest.raises(ValueError, match="positive"):
    postprocess.valid_mask_size((1, 1), 0, 4)


def test_valid_mask_size_rectangles():
  # A 20x70 image fits (32, 64) as 18x64, masks at (16, 32): stride 2.
  assert postprocess.valid_mask_size((18, 64), (32, 64), (16, 32)) == (9, 32)
  # KITTI: 375x1242 fits 384x1248 as 377x1248; masks 192x624.
  assert postprocess.valid_mask_size(
      (377, 1248), (384, 1248), (192, 624)) == (189, 624)
  # The axes are not swapped: a tall image padded on the right.
  assert postprocess.valid_mask_size((32, 10), (32, 64), (8, 16)) == (8, 3)
  # An int size is a square, as before.
  assert postprocess.valid_mask_size((10, 64), (64, 64), (16, 16)) == (
      postprocess.valid_mask_size((10, 64), 64, 16))
  with pytest.raises(ValueError, match=r"mask_size=\(16, 0\)"):
    postprocess.valid_mask_size((1, 1), (32, 64), (16, 0))


def test_sequence_to_original_rectangle():
  # Frames of 3x8 fit an (8, 32) input at min(8/3, 32/8) = 8/3 as 8x21;
  # masks at (4, 16) (stride 2) keep ceil(8/2) = 4 rows and ceil(21/2) = 11
  # columns, resized to 3x8 by the pixel-centre rule: output i reads
  # floor((2i + 1) * n / (2 N)).
  rng = np.random.default_rng(0)
  semantic = rng.integers(1, 5, (2, 4, 16)).astype(np.int32)
  instance = rng.integers(0, 3, (2, 4, 16)).astype(np.int32)
  sem, inst = postprocess.sequence_to_original(
      semantic, instance, valid_size=(8, 21), orig_size=(3, 8),
      image_size=(8, 32))
  assert sem.shape == inst.shape == (2, 3, 8)
  rows, cols = [0, 2, 3], [0, 2, 3, 4, 6, 7, 8, 10]
  np.testing.assert_array_equal(sem, semantic[:, rows][:, :, cols])
  np.testing.assert_array_equal(inst, instance[:, rows][:, :, cols])


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


def test_min_pixels_counts_original_pixels():
  # A 3x10 = 30 mask-pixel thing in a 10x10 mask of a 10x14 image covers
  # 3x14 = 42 original pixels: kept with min_pixels=40 although it has 30
  # pixels at mask size.
  semantic = np.ones((10, 10), np.int32)
  instance = np.zeros((10, 10), np.int32)
  semantic[2:5, :], instance[2:5, :] = 2, 5
  is_thing = np.array([False, False, True])
  ids, segments = postprocess.panoptic_at_original(
      semantic, instance, valid_size_in_mask=(10, 10), orig_size=(10, 14),
      is_thing=is_thing, min_pixels=40)
  things = [s for s in segments if s["isthing"]]
  assert len(things) == 1 and things[0]["area"] == 42
  assert int((ids == things[0]["id"]).sum()) == 42
  # At mask size the same rule would have dropped it (30 < 40).
  _, at_mask = postprocess.masks_to_panoptic(
      semantic, instance, is_thing=is_thing, min_pixels=40)
  assert not [s for s in at_mask if s["isthing"]]
  # 38 original pixels (a 2-pixel-high strip 19 pixels long) is dropped.
  semantic2 = np.ones((12, 19), np.int32)
  instance2 = np.zeros((12, 19), np.int32)
  semantic2[4:6, :], instance2[4:6, :] = 2, 3
  ids2, segments2 = postprocess.panoptic_at_original(
      semantic2, instance2, valid_size_in_mask=(12, 19), orig_size=(12, 19),
      is_thing=is_thing, min_pixels=40)
  assert not [s for s in segments2 if s["isthing"]]
  assert int((ids2 == 0).sum()) == 38  # The dropped thing became void.
