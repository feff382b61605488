"""Tests of CityscapesPanopticSource on a tiny cityscapesScripts-layout tree."""

import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from pix2seq_d_jax import data
from pix2seq_d_jax.data import cityscapes_panoptic as cp

# The 19 Cityscapes train classes as createPanopticImgs writes them (label
# ids, things = classes with instances), in its JSON order.
CATEGORIES = [
    {'id': i, 'name': n, 'supercategory': s, 'isthing': t, 'color': [i, 0, 0]}
    for i, n, s, t in (
        (7, 'road', 'flat', 0),
        (8, 'sidewalk', 'flat', 0),
        (11, 'building', 'construction', 0),
        (12, 'wall', 'construction', 0),
        (13, 'fence', 'construction', 0),
        (17, 'pole', 'object', 0),
        (19, 'traffic light', 'object', 0),
        (20, 'traffic sign', 'object', 0),
        (21, 'vegetation', 'nature', 0),
        (22, 'terrain', 'nature', 0),
        (23, 'sky', 'sky', 0),
        (24, 'person', 'human', 1),
        (25, 'rider', 'human', 1),
        (26, 'car', 'vehicle', 1),
        (27, 'truck', 'vehicle', 1),
        (28, 'bus', 'vehicle', 1),
        (31, 'train', 'vehicle', 1),
        (32, 'motorcycle', 'vehicle', 1),
        (33, 'bicycle', 'vehicle', 1),
    )
]
# Contiguous class of a category id: its JSON position + 1 (0 = void).
CLASS = {c['id']: i + 1 for i, c in enumerate(CATEGORIES)}
H, W = 32, 64
# Listed out of name order so the int ids (sorted order) differ from it.
NAMES = ('lindau_000001_000019', 'frankfurt_000000_000294',
         'frankfurt_000001_000100')


def _draw(k):
  """Returns (ids, segments_info, semantic, instance, crowd) of image k.

  Rows: road (stuff id 7), sky (23), then cars 26001.. and persons 24001..
  (thing ids class * 1000 + n), a crowd of cars (id 26, iscrowd 1) and void
  (0). segments_info lists things in reverse id order to check that
  instances are numbered in segments_info order.
  """
  ids = np.zeros((H, W), np.int64)
  ids[0:8] = 7
  ids[8:14] = 23
  things = [(26000 + n + 1, 26) for n in range(k + 1)] + [(24001, 24)]
  for n, (seg_id, _) in enumerate(things):
    ids[14:24, 8 * n:8 * n + 6] = seg_id
  ids[24:28, :20] = 26  # Crowd region.
  # Rows 28: stay void.
  segs = [{'id': 7, 'category_id': 7, 'iscrowd': 0},
          {'id': 23, 'category_id': 23, 'iscrowd': 0}]
  segs += [{'id': s, 'category_id': c, 'iscrowd': 0}
           for s, c in reversed(things)]
  segs.append({'id': 26, 'category_id': 26, 'iscrowd': 1})
  for s in segs:
    s['area'] = int((ids == s['id']).sum())
  sem = np.zeros((H, W), np.int32)
  inst = np.zeros((H, W), np.int32)
  number = 0
  for s in segs:
    sem[ids == s['id']] = CLASS[s['category_id']]
    if s['category_id'] in (24, 26) and not s['iscrowd']:
      number += 1
      inst[ids == s['id']] = number
  return ids, segs, sem, inst, ids == 26


def _write_fixture(root, split='val'):
  """Writes the layout under root; returns {name: expected example}."""
  rng = np.random.default_rng(0)
  png_dir = os.path.join(root, 'gtFine', f'cityscapes_panoptic_{split}')
  os.makedirs(png_dir)
  images, annotations, expected = [], [], {}
  for k, name in enumerate(NAMES):
    city = name.split('_')[0]
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    image_dir = os.path.join(root, 'leftImg8bit', split, city)
    os.makedirs(image_dir, exist_ok=True)
    Image.fromarray(image).save(
        os.path.join(image_dir, f'{name}_leftImg8bit.png'))
    ids, segs, sem, inst, crowd = _draw(k)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1)
    png = f'{name}_gtFine_panoptic.png'
    Image.fromarray(rgb.astype(np.uint8)).save(os.path.join(png_dir, png))
    images.append({'id': name, 'file_name': f'{name}_leftImg8bit.png',
                   'height': H, 'width': W})
    annotations.append({'image_id': name, 'file_name': png,
                        'segments_info': segs})
    expected[name] = {'image': image, 'semantic': sem, 'instance': inst,
                      'crowd': crowd, 'image_id': sorted(NAMES).index(name)}
  with open(os.path.join(root, 'gtFine', f'cityscapes_panoptic_{split}.json'),
            'w') as f:
    json.dump({'images': images, 'annotations': annotations,
               'categories': CATEGORIES}, f)
  return expected


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('cityscapes'))
  return root, _write_fixture(root)


def _json_path(root):
  return os.path.join(root, 'gtFine', 'cityscapes_panoptic_val.json')


def test_reads_back_exactly(dataset, tmp_path):
  root, expected = dataset
  source = cp.CityscapesPanopticSource(root, 'val', cache_dir=str(tmp_path))
  assert len(source) == 3
  assert source.image_names() == list(NAMES)
  for i, name in enumerate(NAMES):
    ex, want = source[i], expected[name]
    np.testing.assert_array_equal(ex['image'], want['image'])
    np.testing.assert_array_equal(ex['semantic'], want['semantic'])
    np.testing.assert_array_equal(ex['instance'], want['instance'])
    np.testing.assert_array_equal(ex['crowd'], want['crowd'])
    assert int(ex['image_id']) == want['image_id']
    assert str(ex['image_name']) == name
    assert (int(ex['height']), int(ex['width'])) == (H, W)
  # Image k has k + 1 cars and a person; crowd pixels are car, no instance.
  assert source[0]['instance'].max() == 2 and source[2]['instance'].max() == 4
  assert (source[1]['semantic'][source[1]['crowd']] == CLASS[26]).all()


def test_metadata_and_normalised_json(dataset, tmp_path):
  root, _ = dataset
  source = cp.CityscapesPanopticSource(root, 'val', cache_dir=str(tmp_path))
  meta = source.metadata
  assert meta.num_classes == 20 and meta.class_names[0] == 'void'
  assert int(meta.is_thing.sum()) == 8 and not meta.is_thing[0]
  np.testing.assert_array_equal(
      meta.class_to_category_id, [0] + [c['id'] for c in CATEGORIES])
  assert meta.class_names[CLASS[33]] == 'bicycle'
  # The evaluator's view: annotations by int id, images under image_folder.
  assert meta.gt_json.startswith(str(tmp_path))
  with open(meta.gt_json) as f:
    gt = json.load(f)
  by_id = {a['image_id']: a for a in gt['annotations']}
  images = {im['id']: im for im in gt['images']}
  with open(_json_path(root)) as f:
    original = {a['image_id']: a for a in json.load(f)['annotations']}
  for i, name in enumerate(NAMES):
    image_id = int(source[i]['image_id'])
    assert by_id[image_id] == dict(original[name], image_id=image_id)
    assert images[image_id]['image_name'] == name
    assert os.path.isfile(
        os.path.join(meta.image_folder, images[image_id]['file_name']))
    assert os.path.isfile(
        os.path.join(meta.gt_folder, by_id[image_id]['file_name']))
  # Same source JSON -> same cached file, left as is.
  mtime = os.path.getmtime(meta.gt_json)
  again = cp.CityscapesPanopticSource(root, 'val', cache_dir=str(tmp_path))
  assert again.metadata.gt_json == meta.gt_json
  assert os.path.getmtime(meta.gt_json) == mtime


def test_get_source_and_pickle(dataset, tmp_path):
  root, expected = dataset
  source = data.get_source(
      'cityscapes_panoptic', data_dir=root, split='val', max_examples=2,
      cache_dir=str(tmp_path))
  assert isinstance(source, cp.CityscapesPanopticSource)
  assert len(source) == 2 and source.image_names() == list(NAMES[:2])
  np.testing.assert_array_equal(
      source.image_ids(), [expected[n]['image_id'] for n in NAMES[:2]])
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(
      clone[1]['semantic'], expected[NAMES[1]]['semantic'])
  assert 'CityscapesPanopticSource' in repr(source) and root not in repr(
      source)


def _copy(dataset, tmp_path):
  root = str(tmp_path / 'copy')
  shutil.copytree(dataset[0], root)
  return root


def test_missing_folders_are_named(dataset, tmp_path):
  root = _copy(dataset, tmp_path)
  city = os.path.join(root, 'leftImg8bit', 'val', 'lindau')
  shutil.rmtree(city)
  with pytest.raises(FileNotFoundError, match=re.escape(city)):
    cp.CityscapesPanopticSource(root, 'val', cache_dir=str(tmp_path))
  shutil.rmtree(os.path.join(root, 'leftImg8bit'))
  with pytest.raises(FileNotFoundError, match='leftImg8bit'):
    cp.CityscapesPanopticSource(root, 'val', cache_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='cityscapes_panoptic_train'):
    cp.CityscapesPanopticSource(root, 'train', cache_dir=str(tmp_path))


def test_inconsistent_json_is_named(dataset, tmp_path):
  root = _copy(dataset, tmp_path)
  path = _json_path(root)
  with open(path) as f:
    content = json.load(f)
  # A PNG segment missing from segments_info: a bad example, skippable.
  content['annotations'][1]['segments_info'].pop(0)
  with open(path, 'w') as f:
    json.dump(content, f)
  source = cp.CityscapesPanopticSource(root, 'val', cache_dir=str(tmp_path))
  with pytest.raises(data.BadExampleError, match=NAMES[1]) as e:
    source[1]
  assert f'{NAMES[1]}_gtFine_panoptic.png' in str(e.value)
  skipping = cp.CityscapesPanopticSource(
      root, 'val', skip_bad_examples=True, cache_dir=str(tmp_path))
  assert str(skipping[1]['image_name']) == NAMES[2]
  assert skipping.bad_indices == {1}
  # An annotation of an unknown image id: the JSON is invalid.
  content['annotations'][2]['image_id'] = 'ulm_000000_000000'
  with open(path, 'w') as f:
    json.dump(content, f)
  with pytest.raises(ValueError, match=r"annotations\[2\].*ulm_000000_000000"):
    cp.CityscapesPanopticSource(root, 'val', cache_dir=str(tmp_path))


def test_panoptic_evaluator_of_the_cityscapes_config(dataset, tmp_path):
  """configs/cityscapes.py's evaluator scores the ground truth PQ = 1."""
  import importlib

  import jax
  import ml_collections

  from pix2seq_d_jax import evaluators, experiment, sharding
  from pix2seq_d_jax.data import preprocess
  from pix2seq_d_jax.evaluation import panoptic

  root, _ = dataset
  config = importlib.import_module('configs.cityscapes').get_config()
  config.input.data_dir = root
  config.input.image_size = config.input.mask_size = W
  config.evals.panoptic.batch_size = 2
  config.evals.panoptic.min_pixels = 1
  source = experiment.make_source(config, 'val')
  experiment.check_metadata(config, source.metadata)  # 20 classes incl. void.
  # The config's 'random' target: stuff segments carry their own ids (here
  # max id + class), which the per-identity vote reads back.
  assert config.input.stuff_identity == 'random'
  is_thing = np.asarray(source.metadata.is_thing, bool)
  truth = {}
  for i in range(len(source)):
    ex = preprocess.preprocess_eval(source[i], image_size=W, mask_size=W)
    sem, inst = ex['semantic'], ex['instance']
    inst = np.where((sem > 0) & ~is_thing[sem], inst.max() + sem, inst)
    truth[round(float(ex['image'].sum()), 2)] = (sem, inst)

  def oracle(params, batch_stats, image, rng):
    del params, batch_stats, rng
    out = [truth[round(float(im.sum()), 2)] for im in np.asarray(image)]
    return (np.stack([o[0] for o in out]), np.stack([o[1] for o in out]))

  evals = evaluators.from_config(
      ml_collections.ConfigDict(config.evals.to_dict()), predict_fn=oracle,
      source=source, preprocess_fn=experiment.eval_preprocess_fn(config),
      mesh=sharding.make_mesh([('data', 1)], jax.devices()[:1]), seed=0,
      workdir=str(tmp_path))
  metrics = evals['panoptic'].run({}, {}, step=5)
  assert metrics['num_images'] == len(NAMES)
  assert metrics['pq'] == metrics['pq_things'] == metrics['pq_stuff'] == 1.0
  # The written files score the same with the offline scorer against the
  # dataset's own (normalised) ground truth.
  pred = tmp_path / 'predictions' / 'panoptic_step5'
  offline = panoptic.pq_compute(
      source.metadata.gt_json, str(pred / 'panoptic.json'),
      gt_folder=source.metadata.gt_folder, pred_folder=str(pred / 'panoptic'))
  assert offline['All']['pq'] == 1.0
  assert offline['Things']['n'] == 2 and offline['Stuff']['n'] == 2
