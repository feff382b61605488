"""Tests of DavisSource on a tiny DAVIS 2017 layout written here."""

import os
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from pix2seq_d_jax import data
from pix2seq_d_jax.data import davis

H, W = 12, 16
# ImageSets order, deliberately not name order; frame counts per sequence.
SEQUENCES = {
    'train': (('bear', 5), ('car-turn', 3)),
    'val': (('dog', 4), ('blackswan', 2)),
}


def voc_palette():
  """The PASCAL VOC colour map DAVIS palettes use (768 ints)."""
  palette = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette += [r, g, b]
  return palette


def write_palette_png(path, ids):
  im = Image.fromarray(ids.astype(np.uint8), mode='P')
  im.putpalette(voc_palette())
  im.save(path)


def draw_ids(seq, t, task):
  """Object ids of frame t: object 1 moves right, object 2 (unsupervised:
  id 3) is a fixed block, a void (255) border row, background elsewhere.
  """
  ids = np.zeros((H, W), np.uint8)
  ids[2:6, t:t + 4] = 1
  ids[7:11, 10:14] = 2 if task == 'semi-supervised' else 3
  ids[-1, :] = 255
  ids[0, 0] = len(seq) % 5  # Differs between sequences.
  return ids


def write_davis(root, sequences=SEQUENCES):
  """Writes the DAVIS 2017 layout; returns {seq: {task: ids [T, H, W]}}."""
  rng = np.random.default_rng(0)
  expected = {}
  for split, seqs in sequences.items():
    image_set = os.path.join(root, 'ImageSets', '2017', f'{split}.txt')
    os.makedirs(os.path.dirname(image_set), exist_ok=True)
    with open(image_set, 'w') as f:
      f.write(''.join(f'{name}\n' for name, _ in seqs))
    for name, num_frames in seqs:
      frame_dir = os.path.join(root, 'JPEGImages', '480p', name)
      os.makedirs(frame_dir)
      expected[name] = {}
      for t in range(num_frames):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(frame_dir, f'{t:05d}.jpg'))
      for task, folder in (('semi-supervised', 'Annotations'),
                           ('unsupervised', 'Annotations_unsupervised')):
        label_dir = os.path.join(root, folder, '480p', name)
        os.makedirs(label_dir)
        ids = np.stack([draw_ids(name, t, task) for t in range(num_frames)])
        for t in range(num_frames):
          write_palette_png(os.path.join(label_dir, f'{t:05d}.png'), ids[t])
        expected[name][task] = ids
  return expected


def decoded_frames(root, name):
  """The JPEG frames of a sequence as PIL decodes them (JPEG is lossy)."""
  frame_dir = os.path.join(root, 'JPEGImages', '480p', name)
  return np.stack([
      np.asarray(Image.open(os.path.join(frame_dir, f)).convert('RGB'))
      for f in sorted(os.listdir(frame_dir))
  ])


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('davis'))
  return root, write_davis(root)


def _copy(dataset, tmp_path):
  root = str(tmp_path / 'copy')
  shutil.copytree(dataset[0], root)
  return root


def test_labels_from_ids_by_hand():
  ids = np.array([[0, 255, 1], [7, 0, 254]], np.uint8)
  out = davis.labels_from_ids(ids)
  np.testing.assert_array_equal(out['semantic'], [[1, 0, 2], [2, 1, 2]])
  np.testing.assert_array_equal(out['instance'], [[0, 0, 1], [7, 0, 254]])
  assert out['semantic'].dtype == out['instance'].dtype == np.int32
  assert out['crowd'].dtype == np.bool_ and not out['crowd'].any()


def test_single_frame_clips_read_back_exactly(dataset):
  root, expected = dataset
  source = davis.DavisSource(root, 'val')
  assert source.sequence_names == ['dog', 'blackswan']  # ImageSets order.
  assert len(source) == 4 + 2
  np.testing.assert_array_equal(
      source.clip_starts(), [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1]])
  i = 0
  for s, name in enumerate(source.sequence_names):
    frames = decoded_frames(root, name)
    ids = expected[name]['unsupervised']
    for t in range(len(ids)):
      ex = source[i]
      i += 1
      np.testing.assert_array_equal(ex['image'], frames[t:t + 1])
      assert ex['image'].shape == (1, H, W, 3) and ex['image'].dtype == np.uint8
      # Void (255) -> 0, background -> 1, object -> 2; instance = object id.
      want_sem = np.where(ids[t] == 255, 0, np.where(ids[t] == 0, 1, 2))
      want_inst = np.where((ids[t] == 0) | (ids[t] == 255), 0, ids[t])
      np.testing.assert_array_equal(ex['semantic'], want_sem[None])
      np.testing.assert_array_equal(ex['instance'], want_inst[None])
      assert ex['crowd'].shape == (1, H, W) and not ex['crowd'].any()
      assert int(ex['sequence_index']) == s
      np.testing.assert_array_equal(ex['frame_index'], [t])
      assert int(ex['image_id']) == s * davis.CLIP_ID_STRIDE + t
      assert (int(ex['height']), int(ex['width'])) == (H, W)
      assert ex['image_id'].dtype == np.int64
      assert ex['frame_index'].dtype == ex['sequence_index'].dtype == np.int32
  # The unsupervised objects are ids 1 and 3 as drawn.
  assert set(np.unique(source[0]['instance'])) == {0, 1, 3}
  # The JPEGs were drawn from noise; the decoded frames stay close to it.
  assert frames.std() > 50


def test_clips_enumerate_every_start(dataset):
  root, expected = dataset
  source = davis.DavisSource(root, 'train', clip_length=3)
  # bear: 5 frames -> starts 0, 1, 2; car-turn: 3 frames -> start 0.
  np.testing.assert_array_equal(
      source.clip_starts(), [[0, 0], [0, 1], [0, 2], [1, 0]])
  whole = source.read_sequence('bear')
  assert whole['image'].shape == (5, H, W, 3)
  np.testing.assert_array_equal(whole['frame_index'], np.arange(5))
  for i, start in enumerate((0, 1, 2)):
    ex = source[i]
    assert ex['image'].shape == (3, H, W, 3)
    np.testing.assert_array_equal(ex['frame_index'], [start, start + 1,
                                                      start + 2])
    assert int(ex['image_id']) == start
    for key in ('image', 'semantic', 'instance', 'crowd'):
      np.testing.assert_array_equal(ex[key], whole[key][start:start + 3])
  assert int(source[3]['image_id']) == davis.CLIP_ID_STRIDE
  np.testing.assert_array_equal(
      whole['instance'][:, 2:6, :4].max(axis=(1, 2)), [1, 1, 1, 1, 0])
  # A sequence shorter than the clip gives no clip.
  long_clips = davis.DavisSource(root, 'val', clip_length=3)
  np.testing.assert_array_equal(long_clips.clip_starts(), [[0, 0], [0, 1]])
  assert len(davis.DavisSource(root, 'val', clip_length=5)) == 0
  # Truncation: the first sequences, then the first clips.
  assert len(davis.DavisSource(root, 'train', max_sequences=1)) == 5
  assert len(davis.DavisSource(root, 'train', clip_length=2,
                               max_examples=3)) == 3


def test_task_picks_the_annotation_folder(dataset):
  root, expected = dataset
  semi = davis.DavisSource(root, 'train', task='semi-supervised')
  whole = semi.read_sequence('car-turn')
  ids = expected['car-turn']['semi-supervised']
  np.testing.assert_array_equal(
      whole['instance'], np.where(ids == 255, 0, ids))
  # Objects 1 and 2, and id len('car-turn') % 5 = 3 at pixel (0, 0).
  assert set(np.unique(whole['instance'])) == {0, 1, 2, 3}
  assert semi.metadata.gt_folder == os.path.join(root, 'Annotations', '480p')


def test_sequence_access_and_metadata(dataset):
  root, _ = dataset
  source = davis.DavisSource(root, 'val')
  assert source.num_frames('dog') == 4 and source.num_frames('blackswan') == 2
  assert source.frame_names('blackswan') == ['00000', '00001']
  with pytest.raises(ValueError, match=r"Unknown sequence 'cat'.*'dog'"):
    source.num_frames('cat')
  meta = source.metadata
  assert meta.num_classes == 3
  assert meta.class_names == ('void', 'background', 'object')
  np.testing.assert_array_equal(meta.is_thing, [False, False, True])
  np.testing.assert_array_equal(meta.class_to_category_id, [0, 1, 2])
  assert meta.gt_json == ''
  assert meta.gt_folder == os.path.join(
      root, 'Annotations_unsupervised', '480p')
  assert meta.image_folder == os.path.join(root, 'JPEGImages', '480p')


def test_get_source_and_pickle(dataset):
  root, expected = dataset
  source = data.get_source('davis', data_dir=root, split='val',
                           clip_length=2)
  assert isinstance(source, davis.DavisSource) and len(source) == 3 + 1
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[3]['image'], source[3]['image'])
  np.testing.assert_array_equal(
      clone[3]['instance'],
      np.where(expected['blackswan']['unsupervised'] == 255, 0,
               expected['blackswan']['unsupervised']))
  assert repr(clone) == repr(source)
  assert 'DavisSource' in repr(source) and root not in repr(source)


def test_bad_arguments_and_layout_are_named(dataset, tmp_path):
  root = _copy(dataset, tmp_path)
  with pytest.raises(ValueError, match='split'):
    davis.DavisSource(root, 'test')
  with pytest.raises(ValueError, match='task'):
    davis.DavisSource(root, 'val', task='interactive')
  with pytest.raises(ValueError, match='clip_length'):
    davis.DavisSource(root, 'val', clip_length=0)
  missing = os.path.join(root, 'nowhere')
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    davis.DavisSource(missing, 'val')
  with pytest.raises(FileNotFoundError, match=re.escape(
      os.path.join(root, 'JPEGImages', 'Full-Resolution'))):
    davis.DavisSource(root, 'val', resolution='Full-Resolution')
  # A sequence listed twice.
  image_set = os.path.join(root, 'ImageSets', '2017', 'val.txt')
  with open(image_set, 'a') as f:
    f.write('dog\n')
  with pytest.raises(ValueError, match=r"val\.txt: sequence 'dog'.*twice"):
    davis.DavisSource(root, 'val')
  os.remove(image_set)
  with pytest.raises(FileNotFoundError, match=re.escape(image_set)):
    davis.DavisSource(root, 'val')
  shutil.rmtree(os.path.join(root, 'Annotations_unsupervised'))
  with pytest.raises(FileNotFoundError, match='Annotations_unsupervised'):
    davis.DavisSource(root, 'train')


def test_bad_sequences_raise_or_are_left_out(dataset, tmp_path):
  root = _copy(dataset, tmp_path)
  # bear loses an annotation; car-turn loses its frame folder.
  label = os.path.join(root, 'Annotations_unsupervised', '480p', 'bear',
                       '00003.png')
  os.remove(label)
  with pytest.raises(data.BadExampleError,
                     match=r"'bear': 5 frames in .*bear but 4 annotations"):
    davis.DavisSource(root, 'train')
  # The semi-supervised annotations of bear are complete.
  assert len(davis.DavisSource(root, 'train', task='semi-supervised')) == 8
  frames = os.path.join(root, 'JPEGImages', '480p', 'car-turn')
  shutil.rmtree(frames)
  with pytest.raises(FileNotFoundError, match=re.escape(frames)):
    davis.DavisSource(root, 'train', task='semi-supervised')
  with pytest.raises(data.BadExampleError, match='All sequences'):
    davis.DavisSource(root, 'train', skip_bad_examples=True)
  partial = davis.DavisSource(root, 'train', task='semi-supervised',
                              skip_bad_examples=True)
  assert partial.skipped_sequences == ['car-turn']
  assert partial.sequence_names == ['bear'] and len(partial) == 5


def test_bad_frames_raise_or_are_skipped(dataset, tmp_path):
  root = _copy(dataset, tmp_path)
  frame = os.path.join(root, 'JPEGImages', '480p', 'dog', '00001.jpg')
  with open(frame, 'wb') as f:
    f.write(b'not a jpeg')
  label_dir = os.path.join(root, 'Annotations_unsupervised', '480p')
  small = os.path.join(label_dir, 'blackswan', '00000.png')
  write_palette_png(small, np.zeros((H - 1, W), np.uint8))
  rgb = os.path.join(label_dir, 'dog', '00003.png')
  Image.new('RGB', (W, H)).save(rgb)
  source = davis.DavisSource(root, 'val')
  with pytest.raises(data.BadExampleError, match=re.escape(frame)):
    source[1]
  with pytest.raises(data.BadExampleError,
                     match=re.escape(small) + r'.*\(11, 16\)'):
    source[4]
  with pytest.raises(data.BadExampleError,
                     match=re.escape(rgb) + ".*mode 'RGB'"):
    source[3]
  with pytest.raises(data.BadExampleError, match=re.escape(frame)):
    source.read_sequence('dog')
  skipping = davis.DavisSource(root, 'val', skip_bad_examples=True)
  # Clip 1 is bad -> clip 2; clip 4 is bad -> clip 5; 3 -> 4 (bad) -> 5.
  np.testing.assert_array_equal(skipping[1]['frame_index'], [2])
  assert int(skipping[3]['image_id']) == davis.CLIP_ID_STRIDE + 1
  assert skipping.bad_indices == {1, 3, 4}
  assert int(skipping[0]['image_id']) == 0
