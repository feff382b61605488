"""Tests of panoptic post-processing and the resize-to-original helpers."""

import numpy as np
import pytest

from pix2seq_d_jax.data import preprocess
from pix2seq_d_jax.evaluators import postprocess

# Classes: 0 void, 1 and 2 things, 3 and 4 stuff.
IS_THING = [False, True, True, False, False]
ZERO = {"stuff_identity": "zero"}
RANDOM = {"stuff_identity": "random"}


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
    semantic, instance, is_thing=IS_THING, min_pixels=4, **ZERO
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
    semantic, instance, is_thing=IS_THING, min_pixels=5, **ZERO
  )
  np.testing.assert_array_equal(ids5, np.where(expected == 3, 0, expected))
  assert [s["id"] for s in info5] == [1, 2]


def test_vote_tie_goes_to_smallest_class_and_areas_sum():
  semantic = np.array([[2, 2, 1, 1, 0, 4]])
  instance = np.array([[3, 3, 3, 3, 3, 3]])
  ids, info = postprocess.masks_to_panoptic(
    semantic, instance, is_thing=IS_THING, min_pixels=1, **ZERO
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
  # masks at (4, 16) (stride 2). The reference chain: the 8x21 content
  # resized to 3x8 reads content pixel floor((2i + 1) * n / (2 N)), i.e.
  # rows [1, 4, 6] and columns [1, 3, 6, 9, 11, 14, 17, 19], which are
  # mask pixels of half those (the upsampling repeats each one twice). The
  # old crop of ceil(21/2) = 11 mask columns read [0, 2, 3, 4, 6, 7, 8, 10].
  rng = np.random.default_rng(0)
  semantic = rng.integers(1, 5, (2, 4, 16)).astype(np.int32)
  instance = rng.integers(0, 3, (2, 4, 16)).astype(np.int32)
  sem, inst = postprocess.sequence_to_original(
      semantic, instance, valid_size=(8, 21), orig_size=(3, 8),
      image_size=(8, 32))
  assert sem.shape == inst.shape == (2, 3, 8)
  rows, cols = [0, 2, 3], [0, 1, 3, 4, 5, 7, 8, 9]
  np.testing.assert_array_equal(sem, semantic[:, rows][:, :, cols])
  np.testing.assert_array_equal(inst, instance[:, rows][:, :, cols])


def _old_chain(labels, valid_size, image_size, orig_size):
  """The previous chain: crop ceil(valid / stride) mask pixels, resize once."""
  h, w = postprocess.valid_mask_size(valid_size, image_size,
                                     labels.shape[:2])
  return preprocess.resize_labels(labels[:h, :w], orig_size)


def _three_resizes(labels, valid_size, image_size, orig_size):
  """The reference chain spelled out: upsample, crop the content, resize."""
  up = preprocess.resize_labels(labels, image_size)
  return preprocess.resize_labels(
      up[: valid_size[0], : valid_size[1]], orig_size)


def test_resize_to_original_odd_content_hand_case():
  # Mask 4x2 of an 8x4 input (stride 2), content 5x4, original 5x4.
  # Reference: upsampled rows read mask rows [0,0,1,1,2,2,3,3]; the content
  # keeps the first 5; resizing 5 -> 5 keeps them: [0, 0, 1, 1, 2].
  # The old chain cropped ceil(5/2) = 3 mask rows and resized 3 -> 5:
  # floor((i + 0.5) * 3 / 5) = [0, 0, 1, 2, 2] (row 3 moves by one).
  labels = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.int32)
  out = postprocess.resize_to_original(
      labels, valid_size=(5, 4), image_size=(8, 4), orig_size=(5, 4))
  np.testing.assert_array_equal(
      out, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4],
            [5, 5, 6, 6]])
  assert out.dtype == np.int32
  old = _old_chain(labels, (5, 4), (8, 4), (5, 4))
  np.testing.assert_array_equal(old[:, 0], [1, 1, 3, 5, 5])
  # Content 3 rows to an original of 7: the content rows are
  # floor((i + 0.5) * 3 / 7) = [0, 0, 1, 1, 1, 2, 2], mask rows their // 2.
  rows, _ = postprocess.original_index((4, 2), (3, 4), (8, 4), (7, 4))
  np.testing.assert_array_equal(rows, [0, 0, 0, 0, 0, 1, 1])


@pytest.mark.parametrize(
    "mask,image,valid,orig",
    [((16, 16), (64, 64), (64, 40), (480, 300)),  # stride 4, 40 % 4 == 0
     ((8, 16), (16, 32), (10, 32), (25, 80)),  # stride 2, rectangle
     ((4, 4), (16, 16), (16, 8), (3, 5))])  # downsizing to the original
def test_resize_to_original_equals_old_chain_for_stride_multiples(
    mask, image, valid, orig):
  labels = np.random.default_rng(0).integers(0, 50, (*mask, 2))
  new = postprocess.resize_to_original(
      labels, valid_size=valid, image_size=image, orig_size=orig)
  np.testing.assert_array_equal(new, _old_chain(labels, valid, image, orig))
  np.testing.assert_array_equal(
      new, _three_resizes(labels, valid, image, orig))


def test_resize_to_original_is_the_three_resizes_for_any_content():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 50, (16, 24))
  for valid, orig in (((63, 37), (427, 250)), ((17, 96), (20, 113)),
                      ((1, 1), (4, 4)), ((64, 96), (64, 96))):
    np.testing.assert_array_equal(
        postprocess.resize_to_original(
            labels, valid_size=valid, image_size=(64, 96), orig_size=orig),
        _three_resizes(labels, valid, (64, 96), orig))
  with pytest.raises(ValueError, match="0 < valid <= image"):
    postprocess.resize_to_original(
        labels, valid_size=(65, 10), image_size=(64, 96), orig_size=(4, 4))


def test_min_pixels_counts_original_pixels():
  # A 3x10 = 30 mask-pixel thing in a 10x10 mask of a 10x14 image covers
  # 3x14 = 42 original pixels: kept with min_pixels=40 although it has 30
  # pixels at mask size.
  semantic = np.ones((10, 10), np.int32)
  instance = np.zeros((10, 10), np.int32)
  semantic[2:5, :], instance[2:5, :] = 2, 5
  is_thing = np.array([False, False, True])
  ids, segments = postprocess.panoptic_at_original(
      semantic, instance, valid_size=(10, 10), image_size=(10, 10),
      orig_size=(10, 14), is_thing=is_thing, min_pixels=40, **ZERO)
  things = [s for s in segments if s["isthing"]]
  assert len(things) == 1 and things[0]["area"] == 42
  assert int((ids == things[0]["id"]).sum()) == 42
  # At mask size the same rule would have dropped it (30 < 40).
  _, at_mask = postprocess.masks_to_panoptic(
      semantic, instance, is_thing=is_thing, min_pixels=40, **ZERO)
  assert not [s for s in at_mask if s["isthing"]]
  # 38 original pixels (a 2-pixel-high strip 19 pixels long) is dropped.
  semantic2 = np.ones((12, 19), np.int32)
  instance2 = np.zeros((12, 19), np.int32)
  semantic2[4:6, :], instance2[4:6, :] = 2, 3
  ids2, segments2 = postprocess.panoptic_at_original(
      semantic2, instance2, valid_size=(12, 19), image_size=(12, 19),
      orig_size=(12, 19), is_thing=is_thing, min_pixels=40, **ZERO)
  assert not [s for s in segments2 if s["isthing"]]
  assert int((ids2 == 0).sum()) == 38  # The dropped thing became void.


# Stuff 3 split over ids 4 and 6; id 5 is mostly stuff 3 (3 of 5 pixels,
# the other 2 thing class 1); id 7 is thing 2 with one void pixel; id 0 void.
MIXED_SEMANTIC = np.array([
    [3, 3, 3, 3, 4, 4],
    [3, 3, 3, 3, 4, 4],
    [3, 3, 3, 1, 1, 0],
    [2, 2, 2, 2, 0, 0],
])
MIXED_INSTANCE = np.array([
    [4, 4, 6, 6, 8, 8],
    [4, 4, 6, 6, 8, 8],
    [5, 5, 5, 5, 5, 0],
    [7, 7, 7, 7, 7, 0],
])


def test_random_identity_votes_over_all_pixels_of_each_id():
  ids, info = postprocess.masks_to_panoptic(
      MIXED_SEMANTIC, MIXED_INSTANCE, is_thing=IS_THING, min_pixels=4,
      **RANDOM)
  # One segment per nonzero id, numbered in id order: 4 -> 1, 5 -> 2,
  # 6 -> 3, 7 -> 4, 8 -> 5. Id 5 becomes stuff 3 (3 of its 5 votes), its
  # class-1 pixels included; id 7's void pixel joins its thing-2 segment.
  np.testing.assert_array_equal(ids, [
      [1, 1, 3, 3, 5, 5],
      [1, 1, 3, 3, 5, 5],
      [2, 2, 2, 2, 2, 0],
      [4, 4, 4, 4, 4, 0],
  ])
  assert info == [
      {"id": 1, "category_id": 3, "area": 4, "bbox": [0, 0, 2, 2],
       "iscrowd": 0, "isthing": False},
      {"id": 2, "category_id": 3, "area": 5, "bbox": [0, 2, 5, 1],
       "iscrowd": 0, "isthing": False},
      {"id": 3, "category_id": 3, "area": 4, "bbox": [2, 0, 2, 2],
       "iscrowd": 0, "isthing": False},
      {"id": 4, "category_id": 2, "area": 5, "bbox": [0, 3, 5, 1],
       "iscrowd": 0, "isthing": True},
      {"id": 5, "category_id": 4, "area": 4, "bbox": [4, 0, 2, 2],
       "iscrowd": 0, "isthing": False},
  ]  # fmt: skip
  # min_pixels counts every pixel of an id (void ones too): only the two
  # 5-pixel ids survive 5.
  ids5, info5 = postprocess.masks_to_panoptic(
      MIXED_SEMANTIC, MIXED_INSTANCE, is_thing=IS_THING, min_pixels=5,
      **RANDOM)
  np.testing.assert_array_equal(ids5, np.select(
      [MIXED_INSTANCE == 5, MIXED_INSTANCE == 7], [1, 2], 0))
  assert [(s["category_id"], s["area"]) for s in info5] == [(3, 5), (2, 5)]


def test_zero_identity_on_the_same_prediction():
  ids, info = postprocess.masks_to_panoptic(
      MIXED_SEMANTIC, MIXED_INSTANCE, is_thing=IS_THING, min_pixels=4,
      **ZERO)
  # Stuff 3 is one segment (11 pixels of ids 4, 5 and 6), stuff 4 one;
  # id 5 votes among its 2 thing pixels only (class 1, too small); id 7's
  # 4 thing pixels form the instance, its void pixel stays void.
  np.testing.assert_array_equal(ids, [
      [1, 1, 1, 1, 2, 2],
      [1, 1, 1, 1, 2, 2],
      [1, 1, 1, 0, 0, 0],
      [3, 3, 3, 3, 0, 0],
  ])
  assert [(s["category_id"], s["area"], s["isthing"]) for s in info] == [
      (3, 11, False), (4, 4, False), (2, 4, True)]


def test_random_identity_void_majority_ties_and_id_zero():
  semantic = np.array([[0, 0, 0, 1, 1, 3, 3, 2, 2, 4]])
  instance = np.array([[2, 2, 2, 2, 2, 6, 6, 6, 6, 0]])
  ids, info = postprocess.masks_to_panoptic(
      semantic, instance, is_thing=IS_THING, min_pixels=1, **RANDOM)
  # Id 2: void wins 3:2, so the id is void. Id 6: a 2:2 tie between
  # classes 2 and 3 goes to the smaller class (thing 2). Id 0 is void
  # whatever its class.
  np.testing.assert_array_equal(ids, [[0, 0, 0, 0, 0, 1, 1, 1, 1, 0]])
  assert [(s["category_id"], s["isthing"]) for s in info] == [(2, True)]
  with pytest.raises(ValueError, match="stuff_identity='none'"):
    postprocess.masks_to_panoptic(semantic, instance, is_thing=IS_THING,
                                  stuff_identity="none")


def test_random_identity_min_pixels_at_original_size():
  # A 2x2 mask prediction of a 2x2 input, original 10x14: each mask pixel
  # covers 5x7 = 35 original pixels. Ids 5 and 6 (one mask pixel each)
  # pass min_pixels=35 and fail 36; id 4 (70 pixels) passes both although
  # it has only 2 mask pixels.
  semantic = np.array([[3, 3], [1, 1]])
  instance = np.array([[4, 4], [5, 6]])
  for min_pixels, expected in ((35, [(3, 70), (1, 35), (1, 35)]),
                               (36, [(3, 70)])):
    ids, info = postprocess.panoptic_at_original(
        semantic, instance, valid_size=(2, 2), image_size=(2, 2),
        orig_size=(10, 14), is_thing=IS_THING, min_pixels=min_pixels,
        **RANDOM)
    assert [(s["category_id"], s["area"]) for s in info] == expected
    assert ids.shape == (10, 14)
    assert int((ids == 0).sum()) == 140 - sum(a for _, a in expected)
