"""Tests of CocoPanopticSource on a tiny COCO-layout fixture written here."""

import os
import shutil

import numpy as np
import pytest

from pix2seq_d_jax import data
from pix2seq_d_jax.data import coco_panoptic
from pix2seq_d_jax.data.source_api import BadExampleError
from pix2seq_d_jax.formats import coco_panoptic as pf

# Categories in JSON order: two things and one stuff, with COCO-like ids.
CATEGORIES = [
    {
        'id': 20,
        'name': 'dog',
        'supercategory': 'a',
        'isthing': 1,
        'color': [1, 2, 3],
    },
    {
        'id': 5,
        'name': 'sky',
        'supercategory': 'b',
        'isthing': 0,
        'color': [4, 5, 6],
    },
    {
        'id': 11,
        'name': 'cat',
        'supercategory': 'a',
        'isthing': 1,
        'color': [7, 8, 9],
    },
]
DOG, SKY, CAT = 1, 2, 3  # contiguous class indices


def _draw(h, w, rng):
  """Returns (ids, segments_info, semantic, instance, crowd) for one image.

  Layout: top half sky, bottom-left void, two cats, one dog, one crowd cat,
  and a segment of a category missing from the JSON (must read as void).
  segments_info is deliberately not in id order.
  """
  ids = np.zeros((h, w), np.int32)
  sem = np.zeros((h, w), np.int32)
  inst = np.zeros((h, w), np.int32)
  crowd = np.zeros((h, w), bool)
  ids[: h // 2] = 70000
  sem[: h // 2] = SKY
  spots = [  # (segment id, class, iscrowd, category id)
      (300, CAT, 0, 11),
      (9, DOG, 0, 20),
      (123456, CAT, 0, 11),
      (77, CAT, 1, 11),
      (55, 0, 0, 999),
  ]
  segs = [{'id': 70000, 'category_id': 5, 'iscrowd': 0}]
  next_instance = 1
  for k, (sid, cls, iscrowd, cat_id) in enumerate(spots):
    y = int(rng.integers(0, h - 2))
    x = (k * w) // len(spots)
    ids[y : y + 2, x : x + 2] = sid
    sem[y : y + 2, x : x + 2] = cls
    crowd[y : y + 2, x : x + 2] = bool(iscrowd)
    if cls in (CAT, DOG) and not iscrowd:
      inst[y : y + 2, x : x + 2] = next_instance
      next_instance += 1
    else:
      inst[y : y + 2, x : x + 2] = 0
    segs.append({'id': sid, 'category_id': cat_id, 'iscrowd': iscrowd})
  for s in segs:
    s['area'] = int((ids == s['id']).sum())
    s['bbox'] = [0, 0, 1, 1]
  return ids, segs, sem, inst, crowd


def write_fixture(root, split='val'):
  """Writes 3 images (two PNG, one JPEG) and returns the expected maps."""
  rng = np.random.default_rng(0)
  images, anns, expected = [], [], []
  for i, (h, w, ext) in enumerate(
      [(10, 12, 'png'), (8, 16, 'png'), (12, 10, 'jpg')]
  ):
    image_id = 100 + i
    image = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
    ids, segs, sem, inst, crowd = _draw(h, w, rng)
    name = f'{image_id:012d}'
    pf.write_rgb_image(
        os.path.join(root, f'{split}2017', f'{name}.{ext}'), image
    )
    pf.write_panoptic_png(
        os.path.join(
            root, 'annotations', f'panoptic_{split}2017', f'{name}.png'
        ),
        ids,
    )
    images.append(
        {
            'id': image_id,
            'file_name': f'{name}.{ext}',
            'height': h,
            'width': w,
        }
    )
    anns.append(
        {
            'image_id': image_id,
            'file_name': f'{name}.png',
            'segments_info': segs,
        }
    )
    expected.append(
        {
            'image': image,
            'semantic': sem,
            'instance': inst,
            'crowd': crowd,
            'image_id': image_id,
        }
    )
  pf.write_panoptic_json(
      os.path.join(root, 'annotations', f'panoptic_{split}2017.json'),
      images,
      anns,
      CATEGORIES,
  )
  return expected


@pytest.fixture(name='fixture')
def fixture_fn(tmp_path):
  root = str(tmp_path / 'coco')
  return root, write_fixture(root)


def test_reads_back_exactly_what_was_drawn(fixture):
  root, expected = fixture
  src = coco_panoptic.CocoPanopticSource(root, 'val')
  assert len(src) == 3
  for i, exp in enumerate(expected):
    ex = src[i]
    if i < 2:  # lossless PNG images
      np.testing.assert_array_equal(ex['image'], exp['image'])
    else:  # JPEG: same size, close values
      assert ex['image'].shape == exp['image'].shape
    np.testing.assert_array_equal(ex['semantic'], exp['semantic'])
    np.testing.assert_array_equal(ex['instance'], exp['instance'])
    np.testing.assert_array_equal(ex['crowd'], exp['crowd'])
    assert ex['semantic'].dtype == np.int32
    assert ex['instance'].dtype == np.int32
    assert ex['crowd'].dtype == np.bool_
    assert ex['image_id'] == exp['image_id']
    assert ex['image_id'].dtype == np.int64
    assert (int(ex['height']), int(ex['width'])) == exp['image'].shape[:2]
  np.testing.assert_array_equal(src.image_ids(), [100, 101, 102])


def test_metadata(fixture):
  root, _ = fixture
  meta = coco_panoptic.CocoPanopticSource(root, 'val').metadata
  assert meta.class_names == ('void', 'dog', 'sky', 'cat')
  np.testing.assert_array_equal(meta.class_to_category_id, [0, 20, 5, 11])
  np.testing.assert_array_equal(meta.is_thing, [False, True, False, True])
  assert meta.num_classes == 4
  assert meta.category_id_to_class == {20: 1, 5: 2, 11: 3}
  assert meta.gt_json.endswith('annotations/panoptic_val2017.json')
  assert meta.gt_folder.endswith('annotations/panoptic_val2017')
  assert meta.image_folder.endswith('val2017')
  assert meta.categories == CATEGORIES


def test_max_examples_and_registry(fixture):
  root, _ = fixture
  src = data.get_source(
      'coco_panoptic', data_dir=root, split='val', max_examples=2
  )
  assert len(src) == 2 and int(src[1]['image_id']) == 101
  with pytest.raises(ValueError, match="'coco_panoptic'.*'synthetic'"):
    data.get_source('nope')


def test_missing_layout_errors_name_the_path(tmp_path):
  root = str(tmp_path / 'coco')
  with pytest.raises(FileNotFoundError, match='coco'):
    coco_panoptic.CocoPanopticSource(root, 'val')
  write_fixture(root)
  with pytest.raises(FileNotFoundError, match='panoptic_train2017.json'):
    coco_panoptic.CocoPanopticSource(root, 'train')
  shutil.rmtree(os.path.join(root, 'annotations', 'panoptic_val2017'))
  with pytest.raises(FileNotFoundError, match='panoptic_val2017'):
    coco_panoptic.CocoPanopticSource(root, 'val')
  with pytest.raises(ValueError, match="'test'"):
    coco_panoptic.CocoPanopticSource(root, 'test')


def _png(root, i):
  return os.path.join(
      root, 'annotations', 'panoptic_val2017', f'{100 + i:012d}.png'
  )


def test_bad_examples_raise_naming_the_file(fixture):
  root, _ = fixture
  src = coco_panoptic.CocoPanopticSource(root, 'val')
  # Undecodable PNG.
  with open(_png(root, 0), 'wb') as f:
    f.write(b'garbage')
  with pytest.raises(BadExampleError, match='000000000100.png'):
    src[0]
  # A segment id in the PNG that segments_info does not list.
  ids = pf.read_panoptic_png(_png(root, 1))
  ids[0, 0] = 4242
  pf.write_panoptic_png(_png(root, 1), ids)
  with pytest.raises(
      BadExampleError, match=r'000000000101.png.*\[4242\]'
  ):
    src[1]
  # Image and label sizes differ.
  pf.write_panoptic_png(_png(root, 2), np.zeros((3, 3), np.int32))
  with pytest.raises(
      BadExampleError,
      match='000000000102.jpg.*000000000102.png',
  ):
    src[2]
  with pytest.raises(IndexError):
    src[3]


def test_skip_mode_substitutes_and_counts(fixture):
  root, expected = fixture
  with open(_png(root, 1), 'wb') as f:
    f.write(b'garbage')
  src = coco_panoptic.CocoPanopticSource(root, 'val', skip_bad_examples=True)
  assert int(src[1]['image_id']) == 102  # the next good example
  assert src.num_skipped == 1 and src.bad_indices == {1}
  assert (
      int(src[1]['image_id']) == 102
  )  # known bad: no re-read, still counted
  assert src.num_skipped == 2
  np.testing.assert_array_equal(src[0]['semantic'], expected[0]['semantic'])
  for i in (0, 2):
    with open(_png(root, i), 'wb') as f:
      f.write(b'garbage')
  with pytest.raises(BadExampleError, match='All 3 examples'):
    src[0]
