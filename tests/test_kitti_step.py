"""Tests of the KITTI-STEP source (deeplab2 layout) and configs/kitti_step."""

import importlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

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
  from tests.test_config_lib import check_rectangular_forward

  config = importlib.import_module('configs.kitti_step').get_config()
  config_lib.validate(config)
  assert config.input.source in data.SOURCES
  assert config.input.num_classes == 20 and config.input.max_instances == 256
  assert tuple(config.input.proceeding_frames) == (-2, -1)
  assert config.input.frames_dropout == 0.2
  assert config.evals.stq.type == 'kitti_step_stq'
  exp = experiment.create(config, total_steps=10)
  abstract = exp.abstract_state
  count = parameter_overview.count_parameters(abstract.params)
  assert abs(count - 94.5e6) / 94.5e6 < 0.02, count
  # Noisy bits (16) + image features (256) + 2 earlier frames x 16 bits.
  conv_in = abstract.params['decoder']['conv_in']['kernel']
  assert conv_in.shape[2] == 16 + 256 + 32
  # Traced at 384x1248 / 192x624 (a 24x78 token grid), no compile.
  check_rectangular_forward(exp, 'kitti_step')


# ------------------------------------------------ STQ evaluator in training


def _stq_evaluator(root, tmp_path, predict_fn, batch_size=1, size=None):
  import jax
  import ml_collections

  from pix2seq_d_jax import sharding
  from pix2seq_d_jax.data import preprocess
  from pix2seq_d_jax.evaluators import kitti_step_stq

  config = ml_collections.ConfigDict(dict(
      type='kitti_step_stq', batch_size=batch_size, length_bucket=4,
      max_sequences=None, max_frames=None, write_predictions=True))
  return kitti_step_stq.KittiStepStqEvaluator(
      name='stq', config=config, predict_fn=predict_fn,
      source=ks.KittiStepSource(root, 'val'),
      # The long side (40) is the image and mask size (or `size`, fitting
      # the frames unscaled): masks are at frame resolution, so a perfect
      # mask prediction survives crop and resize.
      preprocess_fn=lambda raw: preprocess.preprocess_eval(
          raw, image_size=size or W, mask_size=size or W),
      mesh=sharding.make_mesh([('data', 1)], jax.devices()[:1]), seed=0,
      workdir=str(tmp_path / 'work'))


# A square input (the 12x40 frames padded below to 40x40), and a
# rectangular one (padded on the right to 12x48).
@pytest.mark.parametrize('size', [None, (12, 48)])
def test_stq_evaluator_oracle_scores_one(tmp_path, size):
  from pix2seq_d_jax.evaluators import EVALUATORS, kitti_step_stq

  root = _write_tree(tmp_path / 'kitti_step', split='val')
  source = ks.KittiStepSource(root, 'val')
  # The oracle: batch i (one sequence each) predicts sequence i's ground
  # truth (classes and instance ids as the source numbers them), padded to
  # the [1, 4, 40, 40] (or [1, 4, 12, 48]) mask batch the evaluator asks
  # for.
  calls = []

  def oracle(params, batch_stats, images, rng):
    del params, batch_stats, rng
    seq = source.read_sequence(source.sequence_names[len(calls)])
    calls.append(tuple(images.shape))
    out = [np.zeros(images.shape[:4], np.int32) for _ in range(2)]
    for o, key in zip(out, ('semantic', 'instance'), strict=True):
      o[0, :3, :H, :W] = seq[key]
    return tuple(out)

  evaluator = _stq_evaluator(root, tmp_path, oracle, size=size)
  assert EVALUATORS['kitti_step_stq'] is type(evaluator)
  # KITTI-STEP's classes give exactly the STEP benchmark's STQ settings.
  acc, ref = kitti_step_stq.make_accumulator(evaluator.things), (
      stq.kitti_step_accumulator())
  assert (acc.num_classes, acc.things, acc.ignore_label) == (
      ref.num_classes, ref.things, ref.ignore_label)
  metrics = evaluator.run({}, {}, step=7)
  # 3 frames padded to the bucket.
  assert calls == [(1, 4, *(size or (W, W)), 3)] * 2
  assert (metrics['stq'], metrics['aq'], metrics['sq']) == (1.0, 1.0, 1.0)
  assert (metrics['num_sequences'], metrics['num_frames']) == (2, 6)
  out = tmp_path / 'work' / 'predictions' / 'stq_step7'
  written = json.loads((out / 'metrics.json').read_text())
  assert written['per_sequence']['0013'] == {
      'stq': 1.0, 'aq': 1.0, 'sq': 1.0, 'frames': 3}
  # The written STEP PNGs are a prediction folder the CLI scores the same.
  cli = stq.stq_compute(os.path.join(root, 'panoptic_maps', 'val'), str(out))
  assert (cli['STQ'], cli['AQ'], cli['SQ']) == (1.0, 1.0, 1.0)
  sem, track = step_format.read_step_png(out / '0013' / '000001.png')
  _, gt_sem, gt_inst = _frame('0013', 1)
  np.testing.assert_array_equal(sem, gt_sem)
  # Track ids are the source's numbering (crowd and stuff 0).
  assert set(np.unique(track[gt_sem == CAR]).tolist()) == {0, 1, 2}


def test_stq_evaluator_scores_a_class_error_by_hand(tmp_path):
  # Ground truth everywhere except that every sky pixel is predicted road:
  # tracks are untouched, so AQ = 1. SQ pools one confusion matrix over all
  # 6 frames. Road per 12 x 40 frame: 480 px - 80 sky - 80 void - 24 moving
  # car - 16 crowd car - 8 rider - 4 second car = 268, and 12 fewer where
  # 0013 shows the person (frames 1, 2): road 4 * 268 + 2 * 256 = 1584,
  # sky 6 * 80 = 480. Road IoU 1584 / (1584 + 480), sky 0; person, rider
  # and car 1: five classes with a non-empty union.
  root = _write_tree(tmp_path / 'kitti_step', split='val')
  source = ks.KittiStepSource(root, 'val')
  calls = []

  def predict(params, batch_stats, images, rng):
    del params, batch_stats, rng
    seq = source.read_sequence(source.sequence_names[len(calls)])
    calls.append(1)
    sem = np.where(seq['semantic'] == SKY + 1, ROAD + 1, seq['semantic'])
    out = [np.zeros(images.shape[:4], np.int32) for _ in range(2)]
    out[0][0, :3, :H, :W], out[1][0, :3, :H, :W] = sem, seq['instance']
    return tuple(out)

  metrics = _stq_evaluator(root, tmp_path, predict).run({}, {}, step=1)
  sq = (1584 / 2064 + 0.0 + 1.0 + 1.0 + 1.0) / 5
  assert metrics['aq'] == 1.0
  assert metrics['sq'] == pytest.approx(sq, abs=1e-12)
  assert metrics['stq'] == pytest.approx(np.sqrt(sq), abs=1e-12)


@pytest.mark.slow
def test_kitti_step_config_trains_one_step_and_reports_stq(tmp_path):
  # The shipped KITTI-STEP recipe (clips of frames -2, -1, 0, 20 classes,
  # 256 instances, evals.stq) on a KITTI-STEP-layout folder, at a toy
  # rectangular size (image 16x48, mask 4x12: the 12x40 frames fit at
  # 1.2x) instead of 384x1248 / 192x624 and with the skeleton model, so
  # one step and one STQ evaluation run on a CPU in seconds.
  from tests.multiprocess_worker import narrow_model_flags

  data_dir = tmp_path / 'kitti_step'
  _write_tree(data_dir, split='train')
  _write_tree(data_dir, split='val')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / 'w')
  proc = subprocess.run(
      [sys.executable, '-m', 'pix2seq_d_jax.main',
       '--config=configs/kitti_step.py', f'--workdir={workdir}',
       f'--config.input.data_dir={data_dir}',
       '--config.input.image_size=(16,48)', '--config.input.mask_size=4,12',
       '--config.input.batch_size=1', '--config.input.num_workers=0',
       '--config.total_steps=1', *narrow_model_flags(),
       '--config.log_training_steps=1', '--config.evals.stq.batch_size=1',
       '--config.evals.stq.length_bucket=4',
       '--config.diffusion.sample_steps=1',
       '--config.diffusion.sample_steps_later=1'],
      cwd=repo, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu',
               JAX_DISABLE_MOST_OPTIMIZATIONS='1'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert rows[0]['step'] == 1 and np.isfinite(rows[0]['train/loss'])
  scalars = {k: v for r in rows for k, v in r.items()}
  for key in ('stq', 'aq', 'sq'):
    assert 0.0 <= scalars[f'eval/stq/{key}'] <= 1.0, key
  with open(os.path.join(workdir, 'metrics.json')) as f:
    final = json.load(f)['stq']
  assert final['num_sequences'] == 2 and final['num_frames'] == 6
  assert 0.0 <= final['stq'] <= 1.0
  # STEP PNGs of every val frame, at the frames' size.
  out = os.path.join(workdir, 'predictions', 'stq_step1')
  assert sorted(os.listdir(os.path.join(out, '0002'))) == [
      f'{t:06d}.png' for t in range(3)]
  sem, _ = step_format.read_step_png(os.path.join(out, '0002', '000000.png'))
  assert sem.shape == (H, W)
