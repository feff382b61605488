"""Tests of the STQ metric (deeplab2 STQuality rules) and its command line."""

import json
import os
import pickle

import numpy as np
import pytest

from pix2seq_d_jax.evaluation import stq
from pix2seq_d_jax.formats import kitti_step

# A 3-class toy set: 0 road, 1 sky (stuff), 2 car (thing); void 255.
ROAD, SKY, CAR, VOID = 0, 1, 2, 255


def _acc(num_classes=3, things=(CAR,), ignore=VOID, max_inst=1000,
         offset=256**3):
  return stq.StqAccumulator(num_classes, things, ignore, max_inst, offset)


def _maps(*rows):
  """Parses rows like 'r r c1 c1' into (semantic, instance) [1, n] maps."""
  codes = {'r': ROAD, 's': SKY, 'c': CAR, 'v': VOID}
  sem, inst = [], []
  for row in rows:
    s, i = [], []
    for token in row.split():
      s.append(codes[token[0]])
      i.append(int(token[1:] or 0))
    sem.append(s)
    inst.append(i)
  return np.array(sem, np.int32), np.array(inst, np.int32)


def _update(acc, gt_rows, pred_rows, seq=0):
  acc.update(*_maps(gt_rows), *_maps(pred_rows), seq)


def test_perfect_prediction_is_one():
  acc = _acc()
  for seq in ('a', 'b'):
    for frame in range(3):
      row = f'r r s v c{frame + 1} c{frame + 1} c9 c0'
      _update(acc, row, row, seq)
  r = acc.result()
  assert (r['STQ'], r['AQ'], r['SQ'], r['IoU']) == (1.0, 1.0, 1.0, 1.0)
  assert r['ID_per_seq'] == ['a', 'b'] and r['Length_per_seq'] == [3, 3]
  assert r['STQ_per_seq'] == [1.0, 1.0]


def test_id_switch_halfway():
  # Track c1 (8 pixels over 2 frames) is predicted as c1, then as c2: two
  # tubes of 4, each TPA 4 with IoU 4 / (4 + 8 - 4) = 0.5, so
  # AQ = (1/8) * (4 * 0.5 + 4 * 0.5) = 0.5; classes are right, SQ = 1.
  acc = _acc()
  _update(acc, 'r c1 c1 c1 c1', 'r c1 c1 c1 c1')
  _update(acc, 'r c1 c1 c1 c1', 'r c2 c2 c2 c2')
  r = acc.result()
  assert r['AQ'] == pytest.approx(0.5, abs=1e-15)
  assert r['SQ'] == 1.0
  assert r['STQ'] == pytest.approx(np.sqrt(0.5), abs=1e-15)


def test_wrong_class_gives_sq_by_hand():
  # road: TP 4, FP 2 -> 4/6; sky: TP 2, FN 2 -> 2/4; car: 2/2.
  # SQ = (2/3 + 1/2 + 1) / 3 = 13/18; the car track is perfect, AQ = 1.
  acc = _acc()
  _update(acc, 'r r r r s s s s c1 c1', 'r r r r s s r r c1 c1')
  r = acc.result()
  assert r['SQ'] == pytest.approx(13 / 18, abs=1e-15)
  assert r['AQ'] == 1.0
  assert r['STQ'] == pytest.approx(np.sqrt(13 / 18), abs=1e-15)


def test_same_track_id_in_two_sequences_is_two_tracks():
  # Sequence a: c1 perfect (AQ 1). Sequence b: c1 (4 pixels) split into
  # tubes c1, c2 of 2 pixels: (1/4) * (2 * 2/4 + 2 * 2/4) = 0.5.
  # Overall AQ = (1 + 0.5) / 2 tracks = 0.75.
  acc = _acc()
  _update(acc, 'r c1 c1 c1 c1', 'r c1 c1 c1 c1', 'a')
  _update(acc, 'r c1 c1 c1 c1', 'r c1 c1 c2 c2', 'b')
  r = acc.result()
  assert r['AQ'] == pytest.approx(0.75, abs=1e-15)
  assert r['AQ_per_seq'] == pytest.approx([1.0, 0.5], abs=1e-15)
  # One sequence instead: one track of 8; tube c1 has 6 pixels, c2 has 2:
  # (1/8) * (6 * 6/8 + 2 * 2/8) = 0.625.
  one = _acc()
  _update(one, 'r c1 c1 c1 c1', 'r c1 c1 c1 c1')
  _update(one, 'r c1 c1 c1 c1', 'r c1 c1 c2 c2')
  assert one.result()['AQ'] == pytest.approx(0.625, abs=1e-15)


def test_ground_truth_ignore_pixels_do_not_count():
  # Whatever is predicted on ground-truth void leaves SQ at 1 (the ignore
  # row is dropped) ...
  acc = _acc()
  _update(acc, 'r r s s v v', 'r r s s s r')
  assert acc.result()['SQ'] == 1.0
  # ... but predicting void on a labelled pixel is a false negative and adds
  # the ignore column as a class with IoU 0 (deeplab2): road 3/4, sky 2/2,
  # ignore 0/1 -> SQ = (3/4 + 1 + 0) / 3.
  acc = _acc()
  _update(acc, 'r r r r s s', 'r r r v s s')
  assert acc.result()['SQ'] == pytest.approx(1.75 / 3, abs=1e-15)


def test_crowd_and_prediction_on_stuff_and_class_agnostic_tracks():
  # Crowd (c0 in the ground truth) is ignored by the tubes: c1 predicted
  # over 4 track + 4 crowd pixels still has |p| = 4, AQ = 1.
  acc = _acc()
  _update(acc, 'c1 c1 c1 c1 c0 c0 c0 c0', 'c1 c1 c1 c1 c1 c1 c1 c1')
  assert acc.result()['AQ'] == 1.0
  # The same tube spilling onto road does count: IoU 4/8, AQ 0.5.
  acc = _acc()
  _update(acc, 'c1 c1 c1 c1 r r r r', 'c1 c1 c1 c1 c1 c1 c1 c1')
  assert acc.result()['AQ'] == pytest.approx(0.5, abs=1e-15)
  # Track pixels predicted as stuff count in |g| only: (1/4) * 2 * 2/4.
  acc = _acc()
  _update(acc, 'c1 c1 c1 c1', 'c1 c1 r r')
  assert acc.result()['AQ'] == pytest.approx(0.25, abs=1e-15)
  # Two thing classes: a car predicted as a person with a consistent id is
  # fully associated (AQ 1); only SQ sees the class error.
  acc = _acc(num_classes=4, things=(2, 3))
  acc.update(np.array([[2, 2, 0]]), np.array([[1, 1, 0]]),
             np.array([[3, 3, 0]]), np.array([[7, 7, 0]]))
  r = acc.result()
  assert r['AQ'] == 1.0
  assert r['SQ'] == pytest.approx(1 / 3, abs=1e-15)  # road 1, car 0, person 0


def _reference_stq(frames, num_classes, things, ignore):
  """STQ straight from the definitions, by boolean masks over each sequence.

  frames: list of (seq, gt_sem, gt_inst, pred_sem, pred_inst).
  """
  seqs = sorted({f[0] for f in frames}, key=str)
  aq_sum, num_tracks = 0.0, 0
  for seq in seqs:
    fs = [f for f in frames if f[0] == seq]
    gs, gi, ps, pi = (np.concatenate([f[k].ravel() for f in fs])
                      for k in range(1, 5))
    gt_thing, pred_thing = np.isin(gs, things), np.isin(ps, things)
    crowd = gt_thing & (gi == 0)
    tracks = {(s, i) for s, i in zip(gs[gt_thing & ~crowd],
                                     gi[gt_thing & ~crowd], strict=True)}
    tubes = {(s, i) for s, i in zip(ps[pred_thing & ~crowd],
                                    pi[pred_thing & ~crowd], strict=True)}
    for s, i in tracks:
      g = (gs == s) & (gi == i) & ~crowd
      total = 0.0
      for t, j in tubes:
        p = (ps == t) & (pi == j) & ~crowd
        tpa = np.sum(g & p)
        if tpa:
          total += tpa * tpa / np.sum(g | p)
      aq_sum += total / g.sum()
      num_tracks += 1
  gs = np.concatenate([f[1].ravel() for f in frames])
  ps = np.concatenate([f[3].ravel() for f in frames])
  labelled = gs != ignore
  ious = []
  for c in list(range(num_classes)) + [ignore]:
    tp = np.sum(labelled & (gs == c) & (ps == c))
    union = np.sum(labelled & ((gs == c) | (ps == c)))
    if union:
      ious.append(tp / union)
  aq = aq_sum / num_tracks
  sq = np.mean(ious)
  return np.sqrt(aq * sq), aq, sq


def _random_frames(rng, n_frames=8):
  frames = []
  for k in range(n_frames):
    shape = (6, 7)
    gs = rng.choice([0, 1, 2, 3, 255], shape, p=[.2, .2, .25, .25, .1])
    ps = rng.choice([0, 1, 2, 3, 255], shape, p=[.2, .2, .25, .3, .05])
    gi = np.where(np.isin(gs, (2, 3)), rng.integers(0, 4, shape), 0)
    pi = np.where(np.isin(ps, (2, 3)), rng.integers(0, 5, shape),
                  rng.integers(0, 3, shape))
    frames.append((('s1', 's2', 3)[k % 3], gs, gi, ps, pi))
  return frames


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_definition_on_random_sequences(seed):
  frames = _random_frames(np.random.default_rng(seed))
  acc = _acc(num_classes=4, things=(2, 3))
  for seq, *maps in frames:
    acc.update(*maps, seq)
  r = acc.result()
  ref_stq, ref_aq, ref_sq = _reference_stq(frames, 4, (2, 3), 255)
  assert r['AQ'] == pytest.approx(ref_aq, abs=1e-12)
  assert r['SQ'] == pytest.approx(ref_sq, abs=1e-12)
  assert r['STQ'] == pytest.approx(ref_stq, abs=1e-12)
  assert r['ID_per_seq'] == ['s1', 's2', 3]
  assert r['Length_per_seq'] == [3, 3, 2]
  for k, seq in enumerate(r['ID_per_seq']):
    sub = [f for f in frames if f[0] == seq]
    s_stq, s_aq, s_sq = _reference_stq(sub, 4, (2, 3), 255)
    assert r['AQ_per_seq'][k] == pytest.approx(s_aq, abs=1e-12)
    assert r['IoU_per_seq'][k] == pytest.approx(s_sq, abs=1e-12)
    assert r['STQ_per_seq'][k] == pytest.approx(s_stq, abs=1e-12)


def test_ignore_label_inside_the_range_is_equivalent():
  # Our models' convention: class 0 = void, classes shifted by one.
  frames = _random_frames(np.random.default_rng(5))
  outside, inside = _acc(4, (2, 3)), _acc(5, (3, 4), ignore=0)
  for seq, gs, gi, ps, pi in frames:
    outside.update(gs, gi, ps, pi, seq)
    inside.update(np.where(gs == 255, 0, gs + 1), gi,
                  np.where(ps == 255, 0, ps + 1), pi, seq)
  a, b = outside.result(), inside.result()
  for key in ('STQ', 'AQ', 'SQ', 'AQ_per_seq', 'IoU_per_seq'):
    np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-15)


def test_merge_and_pickle_equal_one_accumulator():
  frames = _random_frames(np.random.default_rng(7), n_frames=6)
  whole, part_a, part_b = (_acc(4, (2, 3)) for _ in range(3))
  for seq, *maps in frames:
    whole.update(*maps, seq)
    (part_a if seq == 's1' else part_b).update(*maps, seq)
  merged = pickle.loads(pickle.dumps(part_a))
  merged.merge(part_b)
  assert merged.result() == whole.result()
  with pytest.raises(ValueError, match=r"sequences \['s1'\] are in both"):
    merged.merge(part_a)
  with pytest.raises(ValueError, match='settings differ'):
    merged.merge(_acc(4, (2,)))


def test_sequence_state_round_trips_through_json():
  frames = _random_frames(np.random.default_rng(8), n_frames=6)
  whole = _acc(4, (2, 3))
  for seq, *maps in frames:
    whole.update(*maps, seq)
  rebuilt = _acc(4, (2, 3))
  for seq in whole.sequence_ids:
    rebuilt.add_sequence_state(
        seq, json.loads(json.dumps(whole.sequence_state(seq))))
  assert rebuilt.result() == whole.result()
  with pytest.raises(ValueError, match="sequence 's1' is already here"):
    rebuilt.add_sequence_state('s1', whole.sequence_state('s1'))
  with pytest.raises(ValueError, match=r'confusion of shape \(5, 5\), '
                     r'expected \(4, 4\)'):
    _acc(3, (2,)).add_sequence_state('s1', whole.sequence_state('s1'))


def test_empty_and_no_tracks():
  acc = _acc()
  r = acc.result()
  assert (r['STQ'], r['AQ'], r['SQ'], r['ID_per_seq']) == (0.0, 0.0, 0.0, [])
  _update(acc, 'r r s', 'r r s')  # No thing pixels: AQ 0, so STQ 0.
  r = acc.result()
  assert (r['STQ'], r['AQ'], r['SQ']) == (0.0, 0.0, 1.0)


def test_bad_inputs_name_the_argument():
  acc = _acc()
  sem, inst = _maps('r c1')
  with pytest.raises(ValueError, match=r'pred_sem: expected class ids in '
                     r'\[0, 3\) or ignore_label 255, got \[7\]'):
    acc.update(sem, inst, np.array([[0, 7]]), inst)
  with pytest.raises(ValueError, match=r'gt_inst: .*\[0, 1000\), got \[1000\]'):
    acc.update(sem, np.array([[0, 1000]]), sem, inst)
  with pytest.raises(ValueError, match='differ in shape'):
    acc.update(sem, inst, sem[:, :1], inst)
  with pytest.raises(ValueError, match='gt_sem: expected an integer map'):
    acc.update(sem.astype(float), inst, sem, inst)
  with pytest.raises(ValueError, match='offset=100: expected >= '
                     'num_classes'):
    _acc(offset=100)
  with pytest.raises(ValueError, match=r'things=\(5,\)'):
    _acc(things=(5,))


def _write_folder(root, frames):
  """Writes frames (seq, train ids, track ids) as STEP PNGs under root."""
  counts = {}
  for seq, sem, inst in frames:
    os.makedirs(os.path.join(root, seq), exist_ok=True)
    k = counts[seq] = counts.get(seq, -1) + 1
    kitti_step.write_step_png(
        os.path.join(root, seq, f'{k:06d}.png'), sem, inst)


def test_command_line_scores_png_folders(tmp_path, capsys):
  rng = np.random.default_rng(3)
  gt, pred, expected = [], [], stq.kitti_step_accumulator()
  for k in range(4):
    seq = ('0002', '0006')[k % 2]
    gs = rng.choice([0, 10, 11, 13, 255], (5, 8))
    gi = np.where(np.isin(gs, (11, 13)), rng.integers(0, 300, (5, 8)), 0)
    ps = rng.choice([0, 10, 11, 13], (5, 8))
    pi = np.where(np.isin(ps, (11, 13)), rng.integers(0, 300, (5, 8)), 0)
    gt.append((seq, gs, gi))
    pred.append((seq, ps, pi))
    expected.update(gs, gi, ps, pi, seq)
  _write_folder(tmp_path / 'gt', gt)
  _write_folder(tmp_path / 'pred', pred)
  out = tmp_path / 'out' / 'stq.json'
  code = stq.main(['--gt_folder', str(tmp_path / 'gt'), '--pred_folder',
                   str(tmp_path / 'pred'), '--output', str(out)])
  assert code == 0
  with open(out) as f:
    results = json.load(f)
  want = expected.result()
  assert results['ID_per_seq'] == ['0002', '0006']
  for key in ('STQ', 'AQ', 'SQ', 'STQ_per_seq', 'Length_per_seq'):
    np.testing.assert_allclose(results[key], want[key], rtol=0, atol=1e-15)
  table = capsys.readouterr().out
  assert 'All' in table and f'{100 * want["STQ"]:5.1f}' in table
  # Sequences scored in two processes and merged give identical numbers.
  assert stq.stq_compute(str(tmp_path / 'gt'), str(tmp_path / 'pred'),
                         num_workers=2) == stq.stq_compute(
                             str(tmp_path / 'gt'), str(tmp_path / 'pred'))

  os.remove(tmp_path / 'pred' / '0006' / '000001.png')
  code = stq.main(['--gt_folder', str(tmp_path / 'gt'), '--pred_folder',
                   str(tmp_path / 'pred')])
  assert code == 2
  err = capsys.readouterr().err
  assert 'prediction missing' in err
  assert os.path.join('pred', '0006', '000001.png') in err
