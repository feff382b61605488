"""Tests of the KITTI-STEP source (deeplab2 layout) and configs/kitti_step."""

import importlib
import os
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from pix2seq_d_jax import config_lib, data
from pix2seq_d_jax.data import kitti_step as ks
from pix2seq_d_jax.evaluation import stq
from pix2seq_d_jax.formats import kitti_step as step_format

H, W = 12, 40
ROAD, SKY, PERSON, RIDER, CAR, VOID = 0, 10, 11, 12, 13, 255
SEQUENCES = ('0013', '0002')  # Written out of order: the source sorts.


def _frame(seq, t):
  """Returns (image, train ids, track ids) of frame t of sequence seq.

  Rows 0-2 road, 3-4 sky, 5-6 void. Car track 5 moves right by 2 px per
  frame; in sequence 0013 a person with the same track id 5 appears from
  frame 1 (ids are keyed by (class, track id)); a car without track id
  (crowd) and a rider whose PNG carries a stray track id (stuff: dropped)
  are static.
  """
  rng = np.random.default_rng(100 * int(seq) + t)
  image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  sem = np.full((H, W), ROAD, np.int32)
  inst = np.zeros((H, W), np.int32)
  sem[3:5] = SKY
  sem[5:7] = VOID
  sem[7:11, 2 * t:2 * t + 6] = CAR
  inst[7:11, 2 * t:2 * t + 6] = 5
  sem[7:11, 20:24] = CAR  # Crowd: no track id.
  sem[7:11, 26:28] = RIDER
  inst[7:11, 26:28] = 9
  if seq == '0013' and t >= 1:
    sem[8:12, 30:33] = PERSON
    inst[8:12, 30:33] = 5
  sem[11, 0:4] = CAR  # A second car track, id 300 (G = 1, B = 44).
  inst[11, 0:4] = 300
  return image, sem, inst


def _write_tree(root, split='train', num_frames=3):
  for seq in SEQUENCES:
    for folder in ('images', 'panoptic_maps'):
      os.makedirs(os.path.join(root, folder, split, seq), exist_ok=True)
    for t in range(num_frames):
      image, sem, inst = _frame(seq, t)
      Image.fromarray(image).save(
          os.path.join(root, 'images', split, seq, f'{t:06d}.png'))
      # The ground-truth encoding, written by hand: R, G = id // 256,
      # B = id % 256.
      rgb = np.stack([sem, inst // 256, inst % 256], -1).astype(np.uint8)
      Image.fromarray(rgb).save(
          os.path.join(root, 'panoptic_maps', split, seq, f'{t:06d}.png'))
  return str(root)


@pytest.fixture
def root(tmp_path):
  return _write_tree(tmp_path / 'kitti_step')


def _expected(seq_k, frames):
  """Expected clip fields for frames of sequence seq_k (sorted position)."""
  images, sems, insts, crowds = [], [], [], []
  for t in frames:
    image, sem, inst = _frame(('0002', '0013')[seq_k], t)
    images.append(image)
    sems.append(np.where(sem == VOID, 0, sem + 1))
    crowds.append((sem == CAR) & (inst == 0))
    insts.append(inst)
  return images, sems, insts, crowds


def test_reads_back_exactly_with_clip_numbering(root):
  source = ks.KittiStepSource(root, 'train', clip_length=3)
  assert source.sequence_names == ('0002', '0013')
  assert len(source) == 2
  for index, seq_k in ((0, 0), (1, 1)):
    ex = source[index]
    images, sems, raw, crowds = _expected(seq_k, range(3))
    np.testing.assert_array_equal(ex['image'], np.stack(images))
    np.testing.assert_array_equal(ex['semantic'], np.stack(sems))
    np.testing.assert_array_equal(ex['crowd'], np.stack(crowds))
    assert ex['semantic'].dtype == np.int32 and ex['crowd'].dtype == bool
    assert ex['instance'].dtype == np.int32
    inst = ex['instance']
    # Numbered by first appearance: frame 0 has (car, 5) and (car, 300),
    # in (class, id) order -> 1, 2; the person (class 11, id 5) appears in
    # frame 1 of sequence 0013 -> 3. The rider's stray id and crowd are 0.
    raw, sem = np.stack(raw), np.stack([s - 1 for s in sems])
    np.testing.assert_array_equal(inst[(sem == CAR) & (raw == 5)], 1)
    np.testing.assert_array_equal(inst[(sem == CAR) & (raw == 300)], 2)
    np.testing.assert_array_equal(inst[(sem == PERSON) & (raw == 5)], 3)
    assert not inst[(sem == RIDER) | np.stack(crowds) | (sem < 11)].any()
    assert set(np.unique(inst)) == ({0, 1, 2, 3} if seq_k else {0, 1, 2})
    assert ex['sequence_index'] == seq_k and ex['sequence_index'].dtype == (
        np.int32)
    np.testing.assert_array_equal(ex['frame_index'], [0, 1, 2])
    assert ex['image_id'] == (2, 13)[seq_k] * 10**6
    assert ex['image_id'].dtype == np.int64
    assert (ex['height'], ex['width']) == (H, W)


def test_clip_enumeration_and_limits(root):
  one = ks.KittiStepSource(root, 'train')
  assert len(one) == 6 and one[0]['image'].shape == (1, H, W, 3)
  two = ks.KittiStepSource(root, 'train', clip_length=2)
  assert len(two) == 4
  got = [(int(two[i]['sequence_index']), two[i]['frame_index'].tolist(),
          int(two[i]['image_id'])) for i in range(len(two))]
  assert got == [(0, [0, 1], 2_000_000), (0, [1, 2], 2_000_001),
                 (1, [0, 1], 13_000_000), (1, [1, 2], 13_000_001)]
  # Within a clip a track keeps its id; a new clip renumbers from 1.
  clip = two[3]  # Sequence 0013, frames 1-2: person and cars present.
  assert set(np.unique(clip['instance'])) == {0, 1, 2, 3}
  assert len(ks.KittiStepSource(root, 'train', clip_length=4)) == 0
  assert len(ks.KittiStepSource(root, 'train', max_sequences=1)) == 3
  assert len(ks.KittiStepSource(root, 'train', max_examples=4)) == 4
  with pytest.raises(IndexError, match=r'index 6 out of range \[0, 6\)'):
    one[6]


def test_sequence_access_is_consistent(root):
  source = ks.KittiStepSource(root, 'train', clip_length=2)
  assert source.num_frames('0013') == 3
  assert source.frame_names('0013') == ['000000', '000001', '000002']
  whole = source.read_sequence('0013')
  assert whole['instance'].shape == (3, H, W)
  frames = list(source.iter_sequence('0013'))
  for key in ('image', 'semantic', 'instance', 'crowd', 'frame_index'):
    np.testing.assert_array_equal(
        np.concatenate([f[key] for f in frames]), whole[key])
  assert [int(f['image_id']) for f in frames] == [
      13_000_000, 13_000_001, 13_000_002]
  # The car keeps id 1 over the sequence, and the clip of frames 0-1 gives
  # the same maps (same first-appearance order).
  car = (whole['semantic'] == CAR + 1) & (whole['instance'] == 1)
  assert [int(car[t].sum()) for t in range(3)] == [24, 24, 24]
  np.testing.assert_array_equal(source[2]['instance'], whole['instance'][:2])
  with pytest.raises(KeyError, match=r"unknown sequence '9999'"):
    source.read_sequence('9999')


def test_metadata_registry_pickle_and_repr(root):
  source = data.get_source('kitti_step', data_dir=root, split='train',
                           clip_length=2)
  assert isinstance(source, ks.KittiStepSource) and len(source) == 4
  meta = source.metadata
  assert meta.num_classes == 20
  assert meta.class_names[1] == 'road' and meta.class_names[19] == 'bicycle'
  assert np.flatnonzero(meta.is_thing).tolist() == [12, 14]  # person, car
  assert meta.class_to_category_id[12] == 24  # Cityscapes label id
  assert meta.gt_folder == os.path.join(root, 'panoptic_maps', 'train')
  copy = pickle.loads(pickle.dumps(source))
  for key, value in source[2].items():
    np.testing.assert_array_equal(copy[2][key], value)
  assert root not in repr(source)
  assert repr(source) == ("KittiStepSource(split='train', clip_length=2, "
                          'num_examples=4, num_sequences=2)')


def test_step_png_round_trip_and_train_ids(tmp_path):
  sem = np.array([[0, 13, 255], [11, 18, 5]])
  inst = np.array([[0, 70000 - 4465, 0], [256, 0, 1]])
  path = str(tmp_path / 'x.png')
  step_format.write_step_png(path, sem, inst)
  got_sem, got_inst = step_format.read_step_png(path)
  np.testing.assert_array_equal(got_sem, sem)
  np.testing.assert_array_equal(got_inst, inst)
  rgb = np.asarray(Image.open(path))
  assert rgb[0, 1].tolist() == [13, 65535 // 256, 65535 % 256]
  np.testing.assert_array_equal(
      ks.class_to_train_id(np.array([0, 1, 14, 19])), [255, 0, 13, 18])
  with pytest.raises(ValueError, match=r'track_ids must be in \[0, 65535\]'):
    step_format.write_step_png(path, sem, inst + 70000)


def test_perfect_prediction_of_a_loaded_sequence_scores_one(root):
  source = ks.KittiStepSource(root, 'train')
  acc = stq.kitti_step_accumulator()
  for name in source.sequence_names:
    for frame in source.iter_sequence(name):
      gt_sem = ks.class_to_train_id(frame['semantic'][0])
      # Crowd is a thing class with instance 0, as in STEP's encoding.
      acc.update(gt_sem, frame['instance'][0], gt_sem, frame['instance'][0],
                 name)
  r = acc.result()
  assert (r['STQ'], r['AQ'], r['SQ']) == (1.0, 1.0, 1.0)
  # 0002: car 5, car 300; 0013: those and person 5.
  assert r['Length_per_seq'] == [3, 3]


def test_setup_errors_name_the_path(tmp_path, root):
  with pytest.raises(FileNotFoundError, match='KITTI-STEP root not found'):
    ks.KittiStepSource(str(tmp_path / 'nope'), 'train')
  with pytest.raises(FileNotFoundError, match=os.path.join(
      'panoptic_maps', 'val')):
    ks.KittiStepSource(root, 'val')
  with pytest.raises(ValueError, match="split must be one of"):
    ks.KittiStepSource(root, 'test')
  with pytest.raises(ValueError, match='clip_length must be an int >= 1'):
    ks.KittiStepSource(root, 'train', clip_length=0)
  shutil.rmtree(os.path.join(root, 'images', 'train', '0013'))
  with pytest.raises(FileNotFoundError, match=r"sequence '0013' not found: "
                     + re.escape(os.path.join(root, 'images', 'train',
                                              '0013'))):
    ks.KittiStepSource(root, 'train')
  os.makedirs(os.path.join(root, 'panoptic_maps', 'train', 'seq_a'))
  with pytest.raises(ValueError, match='seq_a: expected a numeric sequence'):
    ks.KittiStepSource(root, 'train')


def test_bad_frames_raise_or_are_skipped(root):
  seq = os.path.join(root, 'panoptic_maps', 'train', '0002')
  # Frame 1: class id 40 is neither a train id nor void.
  rgb = np.zeros((H, W, 3), np.uint8)
  rgb[0, 0, 0] = 40
  Image.fromarray(rgb).save(os.path.join(seq, '000001.png'))
  # Frame 2 of 0013: its image is missing.
  os.remove(os.path.join(root, 'images', 'train', '0013', '000002.png'))
  source = ks.KittiStepSource(root, 'train')
  with pytest.raises(data.BadExampleError, match=r'000001.png has class ids '
                     r'\[40\]; expected train ids 0..18 or 255'):
    source[1]
  with pytest.raises(data.BadExampleError, match='Image file not found: .*'
                     + os.path.join('0013', '000002.png')):
    source[5]
  with pytest.raises(data.BadExampleError, match='class ids'):
    source.read_sequence('0002')
  lenient = ks.KittiStepSource(root, 'train', skip_bad_examples=True)
  np.testing.assert_array_equal(lenient[1]['frame_index'], [2])
  np.testing.assert_array_equal(lenient[5]['image_id'], 2_000_000)
  assert lenient.bad_indices == {1, 5} and lenient.num_skipped == 2
  # A label of another size than its image.
  Image.fromarray(rgb[:, :20]).save(os.path.join(seq, '000000.png'))
  with pytest.raises(data.BadExampleError, match=r'has size \(12, 40\) but '
                     r'its panoptic map .*000000.png has size \(12, 20\)'):
    source[0]


def test_config_validates_and_builds_the_video_model():
  from clu import parameter_overview

  from pix2seq_d_jax import experiment

  config = importlib.import_module('configs.kitti_step').get_config()
  config_lib.validate(config)
  assert config.input.source in data.SOURCES
  assert config.input.num_classes == 20 and config.input.max_instances == 256
  assert tuple(config.input.proceeding_frames) == (-2, -1)
  assert config.input.frames_dropout == 0.2 and not config.evals
  abstract = experiment.create(config, total_steps=10).abstract_state
  count = parameter_overview.count_parameters(abstract.params)
  assert abs(count - 94.5e6) / 94.5e6 < 0.02, count
  # Noisy bits (16) + image features (256) + 2 earlier frames x 16 bits.
  conv_in = abstract.params['decoder']['conv_in']['kernel']
  assert conv_in.shape[2] == 16 + 256 + 32
