"""Tests of the synthetic panoptic generator and its cache."""

import filecmp
import json
import os

import numpy as np
import pytest

from pix2seq_d_jax import data
from pix2seq_d_jax.data import coco_panoptic, synthetic
from pix2seq_d_jax.formats import coco_panoptic as pf

PARAMS = dict(num_train=6, num_val=3, image_size=32, seed=3)


@pytest.fixture(scope='module', name='root')
def root_fn(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('syn') / 'a')
  synthetic.generate(root, **PARAMS)
  return root


def _all_files(root):
  return sorted(
      os.path.relpath(os.path.join(d, f), root)
      for d, _, files in os.walk(root)
      for f in files
  )


def test_deterministic_per_seed(root, tmp_path):
  other = str(tmp_path / 'b')
  synthetic.generate(other, **PARAMS)
  files = _all_files(root)
  assert files == _all_files(other)
  assert len(files) == 2 * (6 + 3) + 2 + 1  # images, PNGs, 2 JSONs, params
  _, mismatch, errors = filecmp.cmpfiles(root, other, files, shallow=False)
  assert not mismatch and not errors
  # No temporary folder is left next to the dataset.
  assert os.listdir(tmp_path) == ['b']
  third = str(tmp_path / 'c')
  synthetic.generate(third, **{**PARAMS, 'seed': 4})
  _, mismatch, _ = filecmp.cmpfiles(root, third, files, shallow=False)
  assert mismatch


def test_segments_consistent_with_pngs(root):
  cats = {c['id']: c for c in synthetic.categories()}
  assert [c['isthing'] for c in cats.values()] == [1, 1, 1, 1, 0, 0, 0, 0]
  for split, num in (('train', 6), ('val', 3)):
    content = pf.load_panoptic_json(
        os.path.join(root, 'annotations', f'panoptic_{split}2017.json')
    )
    assert len(content['images']) == num == len(content['annotations'])
    for ann in content['annotations']:
      ids = pf.read_panoptic_png(
          os.path.join(
              root,
              'annotations',
              f'panoptic_{split}2017',
              ann['file_name'],
          )
      )
      assert ids.shape == (32, 32)
      listed = {s['id']: s for s in ann['segments_info']}
      assert set(np.unique(ids).tolist()) == set(listed)  # no void
      things = 0
      for sid, seg in listed.items():
        ys, xs = np.nonzero(ids == sid)
        assert seg['area'] == len(ys)
        assert seg['bbox'] == [
            xs.min(),
            ys.min(),
            xs.max() - xs.min() + 1,
            ys.max() - ys.min() + 1,
        ]
        assert seg['category_id'] in cats
        if cats[seg['category_id']]['isthing']:
          things += 1
          assert (
              seg['area'] >= 4
          )  # min visible area at 32x32 (20 at 64x64)
      assert 1 <= things <= 6


def test_reads_back_through_source(root):
  src = coco_panoptic.CocoPanopticSource(root, 'val')
  assert len(src) == 3 and src.metadata.num_classes == 9
  content = pf.load_panoptic_json(src.metadata.gt_json)
  for i, ann in enumerate(content['annotations']):
    ex = src[i]
    assert ex['image'].shape == (32, 32, 3)
    n_things = sum(s['category_id'] <= 4 for s in ann['segments_info'])
    assert ex['instance'].max() == n_things
    ids = pf.read_panoptic_png(
        os.path.join(src.metadata.gt_folder, ann['file_name'])
    )
    # Segment ids encode category * 1000; classes follow the JSON order.
    np.testing.assert_array_equal(ex['semantic'], ids // 1000)
    assert not ex['crowd'].any()


def test_ensure_synthetic_caches(tmp_path, monkeypatch):
  small = dict(num_train=2, num_val=1, image_size=16)
  first = synthetic.ensure_synthetic(str(tmp_path), **small)
  assert os.path.isfile(
      os.path.join(first, 'annotations', 'panoptic_train2017.json')
  )

  def fail(*args, **kwargs):
    raise AssertionError('regenerated a cached dataset')

  monkeypatch.setattr(synthetic, 'generate', fail)
  assert synthetic.ensure_synthetic(str(tmp_path), **small) == first
  src = data.get_source(
      'synthetic', data_dir=str(tmp_path), split='train', **small
  )
  assert len(src) == 2
  assert synthetic.dataset_dir(str(tmp_path), **{**small, 'seed': 1}) != first
  with pytest.raises(TypeError, match='bogus'):
    synthetic.dataset_dir(str(tmp_path), bogus=1)


def test_rectangular_dataset_and_size_spellings(tmp_path):
  root = str(tmp_path / 'rect')
  synthetic.generate(root, num_train=2, num_val=1, image_size=(24, 40),
                     seed=3)
  with open(os.path.join(root, 'params.json')) as f:
    assert json.load(f)['image_size'] == [24, 40]
  src = coco_panoptic.CocoPanopticSource(root, 'train')
  content = pf.load_panoptic_json(src.metadata.gt_json)
  assert {(im['height'], im['width']) for im in content['images']} == {
      (24, 40)}
  for i, ann in enumerate(content['annotations']):
    ex = src[i]
    assert ex['image'].shape == (24, 40, 3)
    assert ex['semantic'].shape == ex['instance'].shape == (24, 40)
    # Segments tile the frame (no void) with exact areas.
    assert sum(s['area'] for s in ann['segments_info']) == 24 * 40
    assert 1 <= sum(s['category_id'] <= 4 for s in ann['segments_info']) <= 6
  # A square renders the same whichever way it is spelled, and 32, (32, 32)
  # and [32, 32] name one cached dataset; a rectangle another.
  square = [synthetic._render_scene(np.random.default_rng([3, 0, 1]), s)
            for s in (32, (32, 32))]
  for a, b in zip(*square, strict=True):
    if isinstance(a, np.ndarray):
      np.testing.assert_array_equal(a, b)
    else:
      assert a == b
  names = {synthetic.dataset_dir(str(tmp_path), image_size=s)
           for s in (32, (32, 32), [32, 32])}
  assert len(names) == 1
  assert synthetic.dataset_dir(str(tmp_path), image_size=(32, 48)) not in names
  with pytest.raises(ValueError, match=r'image_size=\(8, 40\): expected '
                     r'sides >= 16'):
    synthetic.generate(str(tmp_path / 'bad'), image_size=(8, 40))
  with pytest.raises(ValueError, match=r'synthetic image_size=\(16, 16, 3\)'):
    synthetic.generate(str(tmp_path / 'bad'), image_size=(16, 16, 3))
  assert not os.path.exists(tmp_path / 'bad')
