"""Tests of the DAVIS 2017 J&F scorer (davis2017-evaluation semantics)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pix2seq_d_jax.evaluation import davis
from pix2seq_d_jax.formats import davis as davis_format

SEMI, UNSUP = "semi-supervised", "unsupervised"


def square(h, w, y0, y1, x0, x1):
  m = np.zeros((h, w), bool)
  m[y0:y1, x0:x1] = True
  return m


def write_davis(root, sequences, task=SEMI, subset="val", images=True):
  """Writes a DAVIS-layout folder: {name: uint8 [t, h, w] annotations}."""
  folder = "Annotations" if task == SEMI else "Annotations_unsupervised"
  for name, ids in sequences.items():
    for t, frame in enumerate(ids):
      davis_format.write_palette_png(
        root / folder / "480p" / name / f"{t:05d}.png", frame
      )
      if images:
        jpg = root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
        jpg.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((*frame.shape, 3), np.uint8)).save(jpg)
  sets = root / "ImageSets" / "2017"
  sets.mkdir(parents=True, exist_ok=True)
  (sets / f"{subset}.txt").write_text("".join(f"{n}\n" for n in sequences))


def write_results(root, sequences, frames=None):
  for name, ids in sequences.items():
    for t, frame in enumerate(ids):
      if frames is None or t in frames:
        davis_format.write_palette_png(root / name / f"{t:05d}.png", frame)


# --------------------------------------------------------------------------
# J.
# --------------------------------------------------------------------------


def test_iou_excludes_void_and_is_one_on_empty_union():
  gt = square(4, 4, 0, 2, 0, 2)  # 4 pixels
  pred = square(4, 4, 0, 2, 0, 3)  # 6 pixels, 2 outside gt
  void = np.zeros((4, 4), bool)
  void[0, 2] = True  # one of the 2 extra pixels
  np.testing.assert_allclose(davis.db_eval_iou(gt, pred), 4 / 6)
  np.testing.assert_allclose(davis.db_eval_iou(gt, pred, void), 4 / 5)
  void[1, 2] = True  # now all disagreement is void
  assert davis.db_eval_iou(gt, pred, void) == 1.0
  empty = np.zeros((3, 4, 4), bool)
  frames = np.stack([gt, empty[0], gt])
  np.testing.assert_array_equal(
    davis.db_eval_iou(frames, np.stack([pred, empty[0], empty[0]])),
    [4 / 6, 1.0, 0.0],
  )


# --------------------------------------------------------------------------
# F.
# --------------------------------------------------------------------------


def test_boundary_radius():
  assert davis.boundary_radius(7, 9) == 1  # ceil(0.008 * sqrt(130))
  assert davis.boundary_radius(480, 854) == 8  # ceil(7.837...)
  assert davis.boundary_radius(1080, 1920) == 18
  assert davis.boundary_radius(480, 854, 3) == 3  # >= 1: pixels
  with pytest.raises(ValueError, match="integer"):
    davis.boundary_radius(7, 9, 2.5)


def test_seg2bmap_hand_drawn_square():
  seg = square(6, 6, 1, 4, 1, 4)  # 3x3 square at rows/cols 1..3
  expected = np.zeros((6, 6), bool)
  expected[0, 0:4] = expected[3, 0:4] = True  # ring shifted up-left
  expected[0:4, 0] = expected[0:4, 3] = True
  np.testing.assert_array_equal(davis.seg2bmap(seg), expected)
  # A full frame has no boundary: the last row/column only compare along
  # the border and the corner is never set.
  assert not davis.seg2bmap(np.ones((4, 5), bool)).any()
  # A square in the bottom-right corner: the ring lies on the row above and
  # the column left of it; the last row/column hold no boundary of their own
  # (only east resp. south neighbours count there) and the corner is unset.
  corner = square(4, 4, 2, 4, 2, 4)
  expected = np.zeros((4, 4), bool)
  expected[1, 1:4] = True
  expected[1:4, 1] = True
  np.testing.assert_array_equal(davis.seg2bmap(corner), expected)
  # Batched over leading axes.
  np.testing.assert_array_equal(
    davis.seg2bmap(np.stack([seg, seg]))[1], davis.seg2bmap(seg)
  )


def test_dilate_disk_equals_dilation_by_a_numpy_disk():
  rng = np.random.default_rng(0)
  for radius in (0, 1, 2, 3, 8):
    offsets = np.arange(-radius, radius + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
    for density in (0.002, 0.05, 0.6):
      bmap = rng.random((40, 57)) < density
      np.testing.assert_array_equal(
        davis.dilate_disk(bmap, radius),
        ndimage.binary_dilation(bmap, structure=disk),
      )
  assert not davis.dilate_disk(np.zeros((5, 5), bool), 3).any()


def test_f_measure_special_cases():
  gt = square(7, 9, 1, 4, 1, 4)
  empty = np.zeros((7, 9), bool)
  assert davis.db_eval_boundary(gt, gt) == 1.0
  assert davis.db_eval_boundary(gt, empty) == 0.0  # P = 1, R = 0
  assert davis.db_eval_boundary(empty, gt) == 0.0  # P = 0, R = 1
  assert davis.db_eval_boundary(empty, empty) == 1.0  # P = R = 1
  # A full-frame mask has no boundary, so it scores as an empty one.
  assert davis.db_eval_boundary(np.ones((7, 9), bool), empty) == 1.0
  # Void removes the gt square before its boundary is taken.
  assert davis.db_eval_boundary(gt, empty, void=gt) == 1.0


def test_f_measure_hand_computed_radius_one():
  # 7x9 frame: radius 1, the disk is a plus (diagonals do not match).
  gt = square(7, 9, 1, 4, 1, 4)  # boundary ring rows 0..3, cols 0..3
  pred = square(7, 9, 1, 4, 5, 8)  # ring rows 0..3, cols 4..7
  # Only the 4 pixels of gt column 3 touch pred column 4 and vice versa:
  # P = R = 4 / 12, so F = 1 / 3.
  np.testing.assert_allclose(davis.db_eval_boundary(gt, pred), 1 / 3)
  # One column further: the rings are 2 apart and nothing matches.
  assert davis.db_eval_boundary(gt, square(7, 9, 1, 4, 6, 9)) == 0.0
  # Diagonal contact only: the boundary of a single pixel at (4, 4) is
  # (3, 3), (3, 4), (4, 3), (4, 4); the nearest ring pixel of `small`,
  # (2, 2), is sqrt(2) > 1 away, so nothing matches.
  dot = np.zeros((7, 9), bool)
  dot[4, 4] = True
  small = square(7, 9, 1, 3, 1, 3)  # ring rows 0..2, cols 0..2
  assert davis.db_eval_boundary(small, dot) == 0.0


# --------------------------------------------------------------------------
# Statistics.
# --------------------------------------------------------------------------


def test_statistics_recall_is_strictly_above_half():
  mean, recall, _ = davis.db_statistics(np.array([0.5, 0.5, 1.0, 0.0]))
  assert mean == 0.5 and recall == 0.25


def test_decay_bins_for_eight_frames_by_hand():
  # linspace(1, 8, 5) = 1, 2.75, 4.5, 6.25, 8 -> rounded (4.5 up) - 1 =
  # 0, 2, 4, 5, 7: first bin x[0:3], last bin x[5:8].
  x = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
  mean, recall, decay = davis.db_statistics(x)
  np.testing.assert_allclose(decay, 0.9 - 0.4)
  np.testing.assert_allclose(mean, 0.65)
  assert recall == 5 / 8
  x[1] = x[6] = np.nan  # NaNs are skipped in every mean
  _, _, decay = davis.db_statistics(x)
  np.testing.assert_allclose(decay, 0.9 - 0.4)


# --------------------------------------------------------------------------
# Sequences.
# --------------------------------------------------------------------------


def test_semi_supervised_pads_missing_objects_and_rejects_extra_ids():
  t, h, w = 3, 8, 8
  gt = np.stack([square(h, w, 0, 3, 0, 3)] * t)[None]
  gt = np.concatenate([gt, np.stack([square(h, w, 4, 8, 4, 8)] * t)[None]])
  j, f = davis.evaluate_sequence(gt, None, gt[:1], SEMI)
  np.testing.assert_array_equal(j, [[1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(f, [[1, 1, 1], [0, 0, 0]])
  three = np.concatenate([gt, gt[:1]])
  with pytest.raises(ValueError, match="id 3 .* 2 objects"):
    davis.evaluate_sequence(gt, None, three, SEMI)


def test_unsupervised_hungarian_picks_the_best_permutation():
  t, h, w = 4, 10, 12
  left = np.stack([square(h, w, 1, 6, 0, 5)] * t)
  right = np.stack([square(h, w, 1, 6, 6, 12)] * t)
  gt = np.stack([left, right])
  left_pred = np.stack([square(h, w, 1, 6, 0, 4)] * t)  # J = 20 / 25
  junk = np.stack([square(h, w, 7, 10, 0, 12)] * t)
  in_order = np.stack([left_pred, right, junk])
  swapped = np.stack([right, junk, left_pred])
  j1, f1 = davis.evaluate_sequence(gt, None, in_order, UNSUP)
  j2, f2 = davis.evaluate_sequence(gt, None, swapped, UNSUP)
  np.testing.assert_allclose(j1, [[0.8] * t, [1.0] * t])
  # Rows follow the matched proposals' order, as scipy returns them.
  np.testing.assert_array_equal(j2, j1[::-1])
  np.testing.assert_array_equal(f2, f1[::-1])
  # Too few proposals are padded: the unmatched object scores 0.
  j3, _ = davis.evaluate_sequence(gt, None, right[None], UNSUP)
  np.testing.assert_array_equal(np.sort(j3.mean(axis=1)), [0.0, 1.0])


def test_too_many_proposals_is_an_error(tmp_path):
  h, w = 5, 24
  gt = np.zeros((3, h, w), np.uint8)
  gt[:, :, :2] = 1
  pred = np.zeros_like(gt)
  pred[2, 0, 1:22] = np.arange(1, 22)  # 21 proposals, in the last frame
  with pytest.raises(ValueError, match="id 21; at most 20"):
    davis.evaluate_sequence_ids(gt, pred, UNSUP)
  write_davis(tmp_path / "davis", {"s": gt}, task=UNSUP)
  write_results(tmp_path / "res", {"s": pred})
  with pytest.raises(ValueError, match=r"s/00002.png: .*at most 20"):
    davis.evaluate(str(tmp_path / "davis"), str(tmp_path / "res"), UNSUP)


def test_object_count_comes_from_the_first_annotation():
  t, h, w = 5, 8, 10
  gt = np.zeros((t, h, w), np.uint8)
  gt[:, 0:3, 0:3] = 1
  gt[3, 5:8, 5:8] = 2  # appears only in frame 3: not an object
  pred = (gt == 1).astype(np.uint8)
  j, f = davis.evaluate_sequence_ids(gt, pred, SEMI)
  assert j.shape == (1, 3)
  np.testing.assert_array_equal(j, 1.0)
  with pytest.raises(ValueError, match="id 2 .* 1 objects"):
    davis.evaluate_sequence_ids(gt, np.where(gt == 2, 2, pred), SEMI)
  # An object of frame 0 that then disappears still counts; where it and the
  # prediction are both empty J = F = 1.
  gt2 = gt.copy()
  gt2[3] = np.where(gt2[3] == 2, 0, gt2[3])
  gt2[0, 5:8, 5:8] = 2
  j, f = davis.evaluate_sequence_ids(gt2, pred, SEMI)
  assert j.shape == (2, 3)
  np.testing.assert_array_equal(j[1], 1.0)
  np.testing.assert_array_equal(f[1], 1.0)


def test_void_is_background_for_semi_and_excluded_for_unsupervised():
  t, h, w = 3, 8, 8
  gt = np.zeros((t, h, w), np.uint8)
  gt[:, 0:4, 0:4] = 1
  gt[:, 0:4, 4:6] = 255
  pred = np.zeros_like(gt)
  pred[:, 0:4, 0:6] = 1  # covers the object and the void strip
  j_semi, _ = davis.evaluate_sequence_ids(gt, pred, SEMI)
  j_unsup, _ = davis.evaluate_sequence_ids(gt, pred, UNSUP)
  np.testing.assert_allclose(j_semi, [[16 / 24]])  # frame 1 only
  np.testing.assert_array_equal(j_unsup, [[1.0, 1.0, 1.0]])


def test_first_and_last_frames_are_not_scored(tmp_path):
  t, h, w = 5, 24, 32
  gt = np.zeros((t, h, w), np.uint8)
  gt[:, 4:12, 4:12] = 1
  pred = gt.copy()
  pred[0] = pred[-1] = 0  # wrong, but never read
  pred[3] = 0  # scored frames 1, 2, 3 -> J = 1, 1, 0
  j, f = davis.evaluate_sequence_ids(gt, pred, SEMI)
  np.testing.assert_array_equal(j, [[1.0, 1.0, 0.0]])
  np.testing.assert_array_equal(f, [[1.0, 1.0, 0.0]])
  write_davis(tmp_path / "davis", {"s": gt})
  write_results(tmp_path / "res", {"s": pred}, frames={1, 2, 3})
  res = davis.evaluate(str(tmp_path / "davis"), str(tmp_path / "res"), SEMI)
  # Mean 2/3, recall 2/3; T = 3 bins are x[0:2] and x[2:3]: decay 1 - 0.
  for m in ("J", "F"):
    np.testing.assert_allclose(res[f"{m}-Mean"], 2 / 3)
    np.testing.assert_allclose(res[f"{m}-Recall"], 2 / 3)
    assert res[f"{m}-Decay"] == 1.0
  np.testing.assert_allclose(res["J&F-Mean"], 2 / 3)
  # The unsupervised task scores every frame, so frame 0 must exist.
  write_davis(tmp_path / "davis", {"s": gt}, task=UNSUP)
  with pytest.raises(FileNotFoundError, match=r"s/00000.png"):
    davis.evaluate(str(tmp_path / "davis"), str(tmp_path / "res"), UNSUP)


# --------------------------------------------------------------------------
# Folders and command line.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_davis(tmp_path_factory):
  """2 sequences of 5 frames of 24x32, imperfect results."""
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("davis")
  gts, preds = {}, {}
  for name, k in (("bear", 1), ("dogs", 2)):
    gt = np.zeros((5, 24, 32), np.uint8)
    for obj in range(1, k + 1):
      y, x = 2 + 10 * (obj - 1), 3
      for t in range(5):
        gt[t, y : y + 8, x + 2 * t : x + 2 * t + 10] = obj
    gt[:, 20:22, 0:4] = 255
    pred = gt.copy()
    pred[pred == 255] = 0
    flip = rng.random(pred.shape) < 0.05
    pred[flip] = rng.integers(0, k + 1, size=flip.sum())
    gts[name], preds[name] = gt, pred
  write_davis(root / "DAVIS", gts)
  write_results(root / "results", preds)
  perfect = {
    n: np.where(g == 255, 0, g).astype(np.uint8) for n, g in gts.items()
  }
  write_results(root / "perfect", perfect)
  return root


def test_cli_writes_json_and_workers_agree(tiny_davis, tmp_path, capsys):
  davis_path, results = str(tiny_davis / "DAVIS"), str(tiny_davis / "results")
  serial = davis.evaluate(davis_path, results, SEMI)
  assert list(serial["per_sequence"]) == ["bear_1", "dogs_1", "dogs_2"]
  assert 0.5 < serial["J-Mean"] < 1 and 0.3 < serial["F-Mean"] < 1
  j_means = [v["J-Mean"] for v in serial["per_sequence"].values()]
  assert serial["J-Mean"] == np.mean(j_means)
  np.testing.assert_allclose(
    serial["J&F-Mean"], (serial["J-Mean"] + serial["F-Mean"]) / 2
  )
  assert davis.evaluate(davis_path, results, SEMI, num_workers=2) == serial
  out = tmp_path / "out" / "metrics.json"
  rc = davis.main(
    [
      f"--davis_path={davis_path}",
      f"--results_path={results}",
      "--task=semi-supervised",
      "--set=val",
      f"--output={out}",
    ]
  )
  assert rc == 0
  assert json.loads(out.read_text()) == serial
  printed = capsys.readouterr().out
  assert f"{serial['J&F-Mean']:8.3f}" in printed
  assert "dogs_2" in printed


def test_perfect_results_score_one(tiny_davis):
  res = davis.evaluate(
    str(tiny_davis / "DAVIS"), str(tiny_davis / "perfect"), SEMI
  )
  for m in ("J", "F"):
    assert res[f"{m}-Mean"] == res[f"{m}-Recall"] == 1.0
    assert res[f"{m}-Decay"] == 0.0
  assert res["J&F-Mean"] == 1.0
  assert all(
    v == {"J-Mean": 1.0, "F-Mean": 1.0} for v in res["per_sequence"].values()
  )


def test_bad_input_is_a_one_line_error(tiny_davis, tmp_path, capsys):
  davis_path = str(tiny_davis / "DAVIS")
  args = [f"--davis_path={davis_path}", f"--results_path={tmp_path / 'no'}"]
  assert davis.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    f"error: FileNotFoundError: results_path: folder {tmp_path / 'no'} does "
    "not exist"
  ]
  assert davis.main([*args, "--set=train"]) == 2
  assert "train.txt" in capsys.readouterr().err
  # As a module, with the missing result PNG named.
  partial = tmp_path / "partial"
  write_results(partial, {"bear": np.zeros((5, 24, 32), np.uint8)}, {1})
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pix2seq_d_jax.evaluation.davis",
      f"--davis_path={davis_path}",
      f"--results_path={partial}",
    ],
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    check=False,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    "error: FileNotFoundError: DAVIS PNG not found: "
    f"{partial / 'bear' / '00002.png'}"
  ]
