"""Tests of the TFDS ArrayRecord sources on datasets prepared here.

The fixtures are real TFDS folders (dataset_info.json, features.json,
ArrayRecord shards) written by tiny builders with the names, configs,
versions and features of tfds' `davis/480p` and `coco/2017_panoptic`, fed
from folder fixtures the way tfds' own builders read the official files.
Writing uses TensorFlow (tfds' serializer); reading must not.
"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pix2seq_d_jax import data
from pix2seq_d_jax.data import coco_panoptic, davis, tfds_sources
from pix2seq_d_jax.formats import coco_panoptic as pf
from tests import test_davis_source as davis_fixture

# Contiguous classes (JSON position + 1) of the categories drawn below.
CLASS = {n: i + 1 for i, (_, n) in
         enumerate(tfds_sources.COCO_PANOPTIC_CATEGORIES)}
H, W = 10, 14


def _prepare(builder_cls, data_dir):
  builder = builder_cls(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return str(builder.data_dir)


def _davis_builder(davis_root, extra_train):
  """A builder with tfds davis/480p's name, version and features."""
  with tfds.core.registered.skip_registration():

    class Davis(tfds.core.GeneratorBasedBuilder):
      # tfds 4.9.10 locates a builder's source file through
      # importlib_resources, absent on Python >= 3.9; there is no checksum
      # file to find for this builder anyway.
      code_path = None
      VERSION = tfds.core.Version('2.1.0')
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='480p')]

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                'video': tfds.features.Sequence({
                    'frames': tfds.features.Image(shape=(None, None, 3)),
                    'segmentations': tfds.features.Image(
                        shape=(None, None, 1), use_colormap=True),
                }),
                'metadata': {'num_frames': np.int64, 'video_name': np.str_},
            }),
        )

      def _split_generators(self, dl_manager):
        sets = os.path.join(davis_root, 'ImageSets', '2017')
        return {
            'train': self._generate_examples(
                os.path.join(sets, 'train.txt'), extra_train),
            'validation': self._generate_examples(
                os.path.join(sets, 'val.txt'), ()),
        }

      def _generate_examples(self, image_set, extra):
        # As tfds' davis builder: frames as JPEG paths, the semi-supervised
        # annotations as [h, w, 1] palette indices.
        with open(image_set) as f:
          videos = f.read().splitlines()
        for video in videos:
          frame_dir = os.path.join(davis_root, 'JPEGImages', '480p', video)
          label_dir = os.path.join(davis_root, 'Annotations', '480p', video)
          n = len(os.listdir(frame_dir))
          frames = [os.path.join(frame_dir, f'{i:05d}.jpg') for i in range(n)]
          labels = [np.asarray(Image.open(
              os.path.join(label_dir, f'{i:05d}.png')))[:, :, None]
                    for i in range(n)]
          yield video + '480p', {
              'video': {'frames': frames, 'segmentations': labels},
              'metadata': {'num_frames': n, 'video_name': video},
          }
        yield from extra

  return Davis


def _broken_videos():
  """Train records: a frame count that disagrees with num_frames, and a
  segmentation of the wrong size in frame 1."""
  rng = np.random.default_rng(1)
  frames = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(3)]
  labels = [np.zeros((H, W, 1), np.uint8) for _ in range(3)]
  wrong_size = [labels[0], np.zeros((H + 2, W, 1), np.uint8), labels[2]]
  return (
      ('broken-count480p', {
          'video': {'frames': frames, 'segmentations': labels},
          'metadata': {'num_frames': 4, 'video_name': 'broken-count'}}),
      ('broken-size480p', {
          'video': {'frames': frames, 'segmentations': wrong_size},
          'metadata': {'num_frames': 3, 'video_name': 'broken-size'}}),
  )


def _draw_coco(k):
  """Returns (ids, segments_info) of COCO fixture image k.

  Image 0: sky and road (stuff), two persons listed in reverse id order, a
  crowd of cars, void. Image 1: grass and a dog. Image 2: no segment.
  """
  ids = np.zeros((H, W), np.int64)
  segs = []
  if k == 0:
    ids[:3] = 187  # sky-other-merged
    ids[3:5] = 149  # road
    ids[5:9, 0:3] = 1001
    ids[5:9, 4:7] = 1002
    ids[5:9, 8:12] = 3000  # crowd of cars
    segs = [(187, 'sky-other-merged', 0), (149, 'road', 0),
            (1002, 'person', 0), (1001, 'person', 0), (3000, 'car', 1)]
  elif k == 1:
    ids[:, :] = 193  # grass-merged
    ids[2:6, 3:9] = 18018
    segs = [(18018, 'dog', 0), (193, 'grass-merged', 0)]
  cat_id = {n: i for i, n in tfds_sources.COCO_PANOPTIC_CATEGORIES}
  info = []
  for sid, name, crowd in segs:
    ys, xs = np.nonzero(ids == sid)
    info.append({
        'id': sid, 'category_id': cat_id[name], 'iscrowd': crowd,
        'area': int(len(ys)),
        'bbox': [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                 int(ys.max() - ys.min() + 1)],
    })
  return ids, info


def _write_coco(root):
  """COCO 2017 panoptic layout: val images 632, 139, 285 have drawings 0,
  1, 2; train image 25 has a PNG segment missing from its segments_info."""
  rng = np.random.default_rng(2)
  categories = [
      {'id': i, 'name': n, 'supercategory': 's', 'isthing': int(i <= 90),
       'color': [0, 0, 0]}
      for i, n in tfds_sources.COCO_PANOPTIC_CATEGORIES
  ]
  for split, image_ids in (('val', (632, 139, 285)), ('train', (9, 25))):
    images, annotations = [], []
    for k, image_id in enumerate(image_ids):
      name = f'{image_id:012d}'
      pf.write_rgb_image(
          os.path.join(root, f'{split}2017', f'{name}.jpg'),
          rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
      ids, info = _draw_coco(k)
      if split == 'train' and k == 1:
        info = info[1:]
      pf.write_panoptic_png(
          os.path.join(root, 'annotations', f'panoptic_{split}2017',
                       f'{name}.png'), ids)
      images.append({'id': image_id, 'file_name': f'{name}.jpg',
                     'height': H, 'width': W})
      annotations.append({'image_id': image_id, 'file_name': f'{name}.png',
                          'segments_info': info})
    pf.write_panoptic_json(
        os.path.join(root, 'annotations', f'panoptic_{split}2017.json'),
        images, annotations, categories)


def _coco_builder(coco_root):
  """A builder with tfds coco/2017_panoptic's name, version and features."""
  names = [n for _, n in tfds_sources.COCO_PANOPTIC_CATEGORIES]
  with tfds.core.registered.skip_registration():

    class Coco(tfds.core.GeneratorBasedBuilder):
      code_path = None  # See _davis_builder.
      VERSION = tfds.core.Version('1.1.0')
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='2017_panoptic')]

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(encoding_format='jpeg'),
                'image/filename': tfds.features.Text(),
                'image/id': np.int64,
                'panoptic_image': tfds.features.Image(encoding_format='png'),
                'panoptic_image/filename': tfds.features.Text(),
                'panoptic_objects': tfds.features.Sequence({
                    'id': np.int64,
                    'area': np.int64,
                    'bbox': tfds.features.BBoxFeature(),
                    'label': tfds.features.ClassLabel(names=names),
                    'is_crowd': np.bool_,
                }),
            }),
        )

      def _split_generators(self, dl_manager):
        return {'train': self._generate_examples('train'),
                'validation': self._generate_examples('val')}

      def _generate_examples(self, split):
        # As tfds' coco builder: images sorted by id, files as paths,
        # category names as labels, normalised boxes.
        with open(os.path.join(coco_root, 'annotations',
                               f'panoptic_{split}2017.json')) as f:
          gt = json.load(f)
        id_to_name = {c['id']: c['name'] for c in gt['categories']}
        anns = {a['image_id']: a for a in gt['annotations']}
        for im in sorted(gt['images'], key=lambda x: x['id']):
          ann = anns[im['id']]
          objects = []
          for s in ann['segments_info']:
            x, y, w, h = s['bbox']
            objects.append({
                'id': s['id'], 'area': s['area'],
                'bbox': tfds.features.BBox(
                    ymin=y / im['height'], xmin=x / im['width'],
                    ymax=(y + h) / im['height'], xmax=(x + w) / im['width']),
                'label': id_to_name[s['category_id']],
                'is_crowd': bool(s['iscrowd']),
            })
          yield im['file_name'], {
              'image': os.path.join(coco_root, f'{split}2017',
                                    im['file_name']),
              'image/filename': im['file_name'],
              'image/id': im['id'],
              'panoptic_objects': objects,
              'panoptic_image': os.path.join(
                  coco_root, 'annotations', f'panoptic_{split}2017',
                  ann['file_name']),
              'panoptic_image/filename': ann['file_name'],
          }

  return Coco


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """Folder fixtures and the TFDS data dir prepared from them."""
  # tfds serialises examples with TensorFlow; only writing needs it.
  pytest.importorskip('tensorflow')
  base = tmp_path_factory.mktemp('tfds')
  davis_root = str(base / 'davis')
  davis_fixture.write_davis(davis_root)
  coco_root = str(base / 'coco')
  _write_coco(coco_root)
  data_dir = str(base / 'tensorflow_datasets')
  davis_dir = _prepare(_davis_builder(davis_root, _broken_videos()),
                       data_dir)
  coco_dir = _prepare(_coco_builder(coco_root), data_dir)
  return {'davis_root': davis_root, 'coco_root': coco_root,
          'data_dir': data_dir, 'davis_dir': davis_dir, 'coco_dir': coco_dir}


def test_fixtures_are_tfds_array_record_folders(prepared):
  assert prepared['davis_dir'] == os.path.join(
      prepared['data_dir'], 'davis', '480p', '2.1.0')
  assert prepared['coco_dir'] == os.path.join(
      prepared['data_dir'], 'coco', '2017_panoptic', '1.1.0')
  for folder, name in ((prepared['davis_dir'], 'davis'),
                       (prepared['coco_dir'], 'coco')):
    files = os.listdir(folder)
    assert {'dataset_info.json', 'features.json'} <= set(files)
    for split in ('train', 'validation'):
      assert f'{name}-{split}.array_record-00000-of-00001' in files


def test_coco_table_facts():
  table = tfds_sources.COCO_PANOPTIC_CATEGORIES
  assert len(table) == 133 and len({n for _, n in table}) == 133
  ids = [i for i, _ in table]
  assert ids == sorted(ids) and sum(i <= 90 for i in ids) == 80
  assert table[0] == (1, 'person') and table[79] == (90, 'toothbrush')
  assert table[80] == (92, 'banner') and table[-1] == (200, 'rug-merged')


def _same_frames(a, b):
  for key in ('image', 'semantic', 'instance', 'crowd', 'frame_index',
              'height', 'width'):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a[key].dtype == b[key].dtype, key


def test_davis_tfds_equals_the_folder_source(prepared):
  folder = davis.DavisSource(prepared['davis_root'], 'val',
                             task='semi-supervised', clip_length=2)
  source = tfds_sources.DavisTfdsSource(prepared['data_dir'], 'val',
                                        clip_length=2)
  # Sequences in name order (the folder source keeps ImageSets order).
  assert source.sequence_names == ['blackswan', 'dog']
  assert folder.sequence_names == ['dog', 'blackswan']
  assert len(source) == len(folder) == 4
  by_start = {(folder.sequence_names[s], t): i
              for i, (s, t) in enumerate(folder.clip_starts())}
  for i, (s, t) in enumerate(source.clip_starts()):
    ex = source[i]
    _same_frames(ex, folder[by_start[(source.sequence_names[s], t)]])
    assert int(ex['sequence_index']) == s
    assert int(ex['image_id']) == s * davis.CLIP_ID_STRIDE + t
  for name in ('dog', 'blackswan'):
    assert source.num_frames(name) == folder.num_frames(name)
    assert source.frame_names(name) == folder.frame_names(name)
    _same_frames(source.read_sequence(name), folder.read_sequence(name))
  # Pixel-equal to the JPEGs as decoded from the folder, and the labels
  # are the semi-supervised ids as drawn.
  whole = source.read_sequence('dog')
  np.testing.assert_array_equal(
      whole['image'],
      davis_fixture.decoded_frames(prepared['davis_root'], 'dog'))
  ids = np.stack([davis_fixture.draw_ids('dog', t, 'semi-supervised')
                  for t in range(4)])
  np.testing.assert_array_equal(
      whole['instance'], np.where(ids == 255, 0, ids))
  np.testing.assert_array_equal(whole['semantic'][:, -1], 0)


def test_davis_tfds_by_name_pickle_and_metadata(prepared):
  source = data.get_source('davis_tfds', data_dir=prepared['davis_dir'],
                           split='validation')
  assert isinstance(source, tfds_sources.DavisTfdsSource)
  assert len(source) == 6 and source.task == 'semi-supervised'
  assert source.metadata.class_names == ('void', 'background', 'object')
  assert source.metadata.categories == davis.davis_metadata().categories
  np.testing.assert_array_equal(source.metadata.is_thing,
                                [False, False, True])
  clone = pickle.loads(pickle.dumps(source))
  assert clone._records._records is None  # Reopened lazily.
  _same_frames(clone[5], source[5])
  assert repr(clone) == repr(source)
  assert 'DavisTfdsSource' in repr(source)
  assert prepared['davis_dir'] not in repr(source)
  assert len(tfds_sources.DavisTfdsSource(
      prepared['data_dir'], 'val', max_sequences=1)) == 2


def test_davis_tfds_bad_records(prepared):
  with pytest.raises(data.BadExampleError,
                     match=r"record \d.*'broken-count'.*num_frames=4 but 3"):
    tfds_sources.DavisTfdsSource(prepared['data_dir'], 'train')
  source = tfds_sources.DavisTfdsSource(
      prepared['data_dir'], 'train', skip_bad_examples=True)
  assert source.skipped_sequences == ['broken-count']
  assert source.sequence_names == ['bear', 'broken-size', 'car-turn']
  # broken-size: clips 5, 6, 7; frame 1 has a 12x14 segmentation.
  with pytest.raises(data.BadExampleError,
                     match=r"video/frames\[1\].*'broken-size'.*\(12, 14\)"):
    source.read_sequence('broken-size')
  assert int(source[6]['image_id']) == davis.CLIP_ID_STRIDE + 2
  assert source.bad_indices == {6}
  np.testing.assert_array_equal(source[0]['image'][0],
                                davis_fixture.decoded_frames(
                                    prepared['davis_root'], 'bear')[0])


def test_coco_tfds_equals_the_folder_source(prepared):
  folder = coco_panoptic.CocoPanopticSource(prepared['coco_root'], 'val')
  source = data.get_source('coco_panoptic_tfds',
                           data_dir=prepared['data_dir'], split='val')
  assert isinstance(source, tfds_sources.CocoPanopticTfdsSource)
  assert len(source) == len(folder) == 3
  by_id = {int(folder[i]['image_id']): folder[i] for i in range(len(folder))}
  seen = set()
  for i in range(len(source)):
    ex = source[i]
    want = by_id[int(ex['image_id'])]
    seen.add(int(ex['image_id']))
    assert set(ex) == set(want)
    for key in want:
      np.testing.assert_array_equal(ex[key], want[key], err_msg=key)
      assert ex[key].dtype == want[key].dtype, key
  assert seen == {139, 285, 632}
  # Hand-checked image 632 (drawing 0): classes from the category table,
  # persons numbered in segments_info order (1002 first), the crowd has no
  # instance.
  ex = next(source[i] for i in range(3) if int(source[i]['image_id']) == 632)
  assert ex['semantic'][0, 0] == CLASS['sky-other-merged']
  assert ex['semantic'][3, 0] == CLASS['road']
  assert ex['instance'][5, 4] == 1 and ex['instance'][5, 0] == 2
  assert ex['semantic'][5, 8] == CLASS['car'] and ex['crowd'][5, 8]
  assert ex['instance'][5, 8] == 0 and ex['semantic'][9, 0] == 0
  # Metadata: the folder source's, from the same categories, without files.
  for field in ('class_names', 'num_classes'):
    assert getattr(source.metadata, field) == getattr(folder.metadata, field)
  np.testing.assert_array_equal(source.metadata.is_thing,
                                folder.metadata.is_thing)
  np.testing.assert_array_equal(source.metadata.class_to_category_id,
                                folder.metadata.class_to_category_id)
  assert source.metadata.gt_json == ''
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[2]['semantic'], source[2]['semantic'])
  assert repr(clone) == repr(source) and 'CocoPanopticTfdsSource' in repr(
      source)


def test_coco_tfds_bad_example(prepared):
  source = tfds_sources.CocoPanopticTfdsSource(prepared['coco_dir'], 'train')
  bad = next(i for i in range(2) if int(source._records[i]['image/id']) == 25)
  with pytest.raises(data.BadExampleError,
                     match=r'000000000025\.jpg.*\[18018\].*panoptic_objects'):
    source[bad]
  skipping = tfds_sources.CocoPanopticTfdsSource(
      prepared['coco_dir'], 'train', skip_bad_examples=True)
  assert int(skipping[bad]['image_id']) == 9
  assert skipping.bad_indices == {bad}
  assert len(tfds_sources.CocoPanopticTfdsSource(
      prepared['coco_dir'], 'train', max_examples=1)) == 1


def test_errors_name_the_folder(prepared, tmp_path):
  missing = str(tmp_path / 'none')
  with pytest.raises(FileNotFoundError,
                     match=re.escape(os.path.join(missing, 'davis', '480p'))):
    tfds_sources.DavisTfdsSource(missing, 'val')
  with pytest.raises(ValueError, match=r"dataset_info\.json: expected TFDS "
                     r"dataset 'coco'.*got 'davis'"):
    tfds_sources.CocoPanopticTfdsSource(prepared['davis_dir'], 'val')
  with pytest.raises(ValueError, match='split'):
    tfds_sources.DavisTfdsSource(prepared['davis_dir'], 'test')
  # ClassLabel names that are not COCO panoptic's.
  copy = str(tmp_path / 'coco')
  shutil.copytree(prepared['coco_dir'], copy)
  labels = [f for f in os.listdir(copy) if f.endswith('labels.txt')]
  assert len(labels) == 1
  path = os.path.join(copy, labels[0])
  with open(path) as f:
    names = f.read().splitlines()
  names[3], names[4] = names[4], names[3]
  with open(path, 'w') as f:
    f.write('\n'.join(names) + '\n')
  with pytest.raises(ValueError,
                     match=r"features\.json.*index 3: \['airplane'\]"):
    tfds_sources.CocoPanopticTfdsSource(copy, 'val')


def test_reading_does_not_import_tensorflow(prepared):
  script = textwrap.dedent(f"""
      import pickle, sys
      from pix2seq_d_jax import data
      clips = data.get_source('davis_tfds', data_dir={prepared['data_dir']!r},
                              split='val', clip_length=2)
      coco = data.get_source('coco_panoptic_tfds',
                             data_dir={prepared['data_dir']!r}, split='val')
      pickle.loads(pickle.dumps(clips))[0]
      print(clips[0]['image'].shape, coco[0]['semantic'].shape,
            'tensorflow' in sys.modules)
  """)
  out = subprocess.run(
      [sys.executable, '-c', script], capture_output=True, text=True,
      check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert out.stdout.split() == ['(2,', '12,', '16,', '3)', '(10,', '14)',
                                'False']
