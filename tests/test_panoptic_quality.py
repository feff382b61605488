"""Tests of panoptic quality: hand-computed cases and a numpy reference."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pix2seq_d_jax.evaluation import panoptic
from pix2seq_d_jax.formats import coco_panoptic as coco_format

# 1, 2: things; 3, 4: stuff; 5: a thing that never occurs.
CATEGORIES = {
  1: {"id": 1, "name": "person", "isthing": 1},
  2: {"id": 2, "name": "car", "isthing": 1},
  3: {"id": 3, "name": "sky", "isthing": 0},
  4: {"id": 4, "name": "road", "isthing": 0},
  5: {"id": 5, "name": "dog", "isthing": 1},
}


def seg(segment_id, category_id, iscrowd=0, **extra):
  info = {"id": segment_id, "category_id": category_id, "iscrowd": iscrowd}
  return info | extra


def row(*values):
  return np.array([values], np.int64)


def single(gt, gt_segs, pred, pred_segs, **kwargs):
  stat = panoptic.pq_single_image(
    gt, gt_segs, pred, pred_segs, CATEGORIES, **kwargs
  )
  return stat, panoptic.summarize(stat, CATEGORIES)


def counts(stat, category_id):
  s = stat[category_id]
  return s.tp, s.fp, s.fn


def test_perfect_prediction_scores_one():
  gt = row(1, 1, 2, 2, 3, 3, 0)
  segs = [seg(1, 1), seg(2, 2), seg(3, 3)]
  _, res = single(gt, segs, gt * 7, [seg(7, 1), seg(14, 2), seg(21, 3)])
  for name, n in (("All", 3), ("Things", 2), ("Stuff", 1)):
    assert res[name] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}
  assert res["per_class"]["5"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def test_iou_exactly_half_does_not_match():
  gt = row(1, 1, 1, 1, 2, 2, 2, 2)
  pred = row(5, 5, 6, 6, 6, 6, 6, 6)
  stat, _ = single(gt, [seg(1, 1), seg(2, 3)], pred, [seg(5, 1), seg(6, 3)])
  assert counts(stat, 1) == (0, 1, 1)
  assert stat[1].iou == 0.0
  # The stuff segment matches: 4 / (6 + 4 - 4).
  assert counts(stat, 3) == (1, 0, 0)
  np.testing.assert_allclose(stat[3].iou, 4 / 6)


def test_iou_above_half_matches_with_hand_sq():
  gt = row(1, 1, 1, 1, 1, 1, 1, 1, 1, 2)
  pred = row(5, 5, 5, 5, 5, 6, 6, 6, 6, 6)
  stat, res = single(gt, [seg(1, 1), seg(2, 3)], pred, [seg(5, 1), seg(6, 4)])
  assert counts(stat, 1) == (1, 0, 0)
  assert res["per_class"]["1"]["sq"] == 5 / 9
  # Category 3 is a false negative, category 4 a false positive.
  assert counts(stat, 3) == (0, 0, 1)
  assert counts(stat, 4) == (0, 1, 0)
  np.testing.assert_allclose(res["All"]["pq"], (5 / 9 + 0 + 0) / 3)
  np.testing.assert_allclose(res["Things"]["pq"], 5 / 9)
  assert res["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_void_is_removed_from_union():
  # inter 3, pred 5, gt 4, pred on void 2: IoU 3 / (5 + 4 - 3 - 2) = 0.75;
  # without the void rule it would be 3 / 6 = 0.5, no match.
  gt = row(0, 0, 1, 1, 1, 1)
  pred = row(9, 9, 9, 9, 9, 0)
  stat, _ = single(gt, [seg(1, 1)], pred, [seg(9, 1)])
  assert counts(stat, 1) == (1, 0, 0)
  assert stat[1].iou == 0.75


def test_crowd_rules():
  # 1: crowd of class 1 (8 px), 2: non-crowd class 1 never predicted.
  gt = row(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2)
  gt_segs = [seg(1, 1, iscrowd=1), seg(2, 1)]
  pred = row(5, 5, 5, 0, 6, 6, 6, 7, 8, 8, 3, 3, 0, 0)
  pred_segs = [seg(5, 1), seg(6, 2), seg(7, 1), seg(8, 2), seg(3, 1)]
  stat, _ = single(gt, gt_segs, pred, pred_segs)
  # Class 1: the crowd is no FN, the non-crowd segment is. Pred 5 lies on its
  # own crowd (3/3 > 0.5): ignored. Pred 7 + 3: 7 (1 px, all crowd) ignored;
  # 3 (2 px, all void) ignored.
  assert counts(stat, 1) == (0, 0, 1)
  # Class 2: pred 6 lies on class-1 crowd, which does not excuse it; pred 8
  # lies on void: ignored.
  assert counts(stat, 2) == (0, 1, 0)


def test_exactly_half_on_void_is_false_positive():
  gt = row(0, 0, 4, 4, 4, 4, 4, 4)
  pred = row(5, 5, 5, 5, 6, 6, 6, 6)
  stat, _ = single(gt, [seg(4, 4)], pred, [seg(5, 1), seg(6, 4)])
  assert counts(stat, 1) == (0, 1, 0)
  # IoU of the stuff segment: 4 / (4 + 6 - 4) = 0.667.
  assert counts(stat, 4) == (1, 0, 0)


@pytest.mark.parametrize(
  ("merge_crowd", "order", "fp"),
  [(True, (1, 2), 0), (False, (1, 2), 1), (False, (2, 1), 1)],
)
def test_crowd_segments_of_one_category_merge(merge_crowd, order, fp):
  # Pred 9 (4 px): 2 px on crowd 1, 1 px on crowd 2, 1 px on person 3.
  gt = row(1, 1, 2, 3, 3, 3)
  gt_segs = [seg(i, 1, iscrowd=1) for i in order] + [seg(3, 1)]
  pred = row(9, 9, 9, 9, 0, 0)
  stat, _ = single(gt, gt_segs, pred, [seg(9, 1)], merge_crowd=merge_crowd)
  # Merged: 3/4 on crowd, not an FP. panopticapi's "last listed crowd" rule:
  # 1/4 (crowd 2) or 2/4 (crowd 1), both FPs.
  assert counts(stat, 1) == (0, fp, 1)


def test_empty_prediction_gives_all_false_negatives():
  gt = row(1, 1, 2, 3, 3, 0)
  stat, res = single(
    gt, [seg(1, 1), seg(2, 2), seg(3, 3)], np.zeros_like(gt), []
  )
  assert [counts(stat, c) for c in (1, 2, 3)] == [(0, 0, 1)] * 3
  assert res["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 3}


def test_json_area_ignored_for_predictions_used_for_ground_truth():
  gt = row(1, 1, 1, 1, 2, 2)
  pred = row(5, 5, 5, 6, 6, 6)
  pred_segs = [seg(5, 1, area=999), seg(6, 3, area=1)]
  stat, _ = single(gt, [seg(1, 1), seg(2, 3)], pred, pred_segs)
  assert stat[1].iou == 3 / 4
  # Ground-truth areas come from the JSON, as in panopticapi: with area 5
  # the union is 3 + 5 - 3.
  gt_segs = [seg(1, 1, area=5), seg(2, 3, area=2)]
  stat, _ = single(gt, gt_segs, pred, pred_segs)
  assert stat[1].iou == 3 / 5
  stat, _ = single(gt, gt_segs, pred, pred_segs, use_gt_json_area=False)
  assert stat[1].iou == 3 / 4


@pytest.mark.parametrize(
  ("pred_segs", "message"),
  [
    ([seg(5, 1)], "segment id 6 is in the prediction PNG"),
    ([seg(5, 1), seg(6, 1), seg(7, 1)], r"segment ids \[7\]"),
    ([seg(5, 1), seg(6, 42)], "category_id 42"),
    ([seg(5, 1), seg(6, 1), seg(6, 2)], "listed twice"),
  ],
)
def test_malformed_prediction_raises(pred_segs, message):
  gt = row(1, 1, 0)
  with pytest.raises(ValueError, match=message):
    single(gt, [seg(1, 1)], row(5, 6, 0), pred_segs, image_name="x.png")


def test_pq_stat_add_and_array_round_trip():
  a, b = panoptic.PQStat(), panoptic.PQStat()
  a[1].tp, a[1].iou, a[3].fn = 2, 1.5, 1
  b[1].fp, b[1].tp, b[1].iou = 1, 1, 0.75
  a += b
  assert (a[1].tp, a[1].fp, a[1].fn, a[1].iou) == (3, 1, 0, 2.25)
  arr = a.to_array([1, 2, 3])
  np.testing.assert_array_equal(arr, [[3, 1, 0, 2.25], [0] * 4, [0, 0, 1, 0]])
  assert panoptic.PQStat.from_array([1, 2, 3], arr) == a


# ---------------------------------------------------------------- end to end


def random_image(rng, h, w):
  """A random panoptic GT and a perturbed prediction (id maps + segments)."""
  gt = np.zeros((h, w), np.int64)
  gt[: h // 2], gt[h // 2 :] = 301, 302
  gt_segs = [seg(301, 3), seg(302, 4)]
  pred = gt.copy()
  pred_segs = [seg(301, 3), seg(302, 4)]
  for k in range(int(rng.integers(2, 6))):
    gid = 1000 + 70001 * k
    cat = int(rng.choice([1, 2]))
    y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
    dy, dx = rng.integers(2, 7, size=2)
    crowd = int(rng.random() < 0.2)
    gt[y : y + dy, x : x + dx] = gid
    gt_segs.append(seg(gid, cat, iscrowd=crowd))
    if rng.random() < 0.8:
      sy, sx = rng.integers(-2, 3, size=2)
      ys, xs = max(y + sy, 0), max(x + sx, 0)
      pid = 5000 + 7 * k
      pred[ys : ys + dy, xs : xs + dx] = pid
      pcat = cat if rng.random() < 0.85 else 3 - cat
      pred_segs.append(seg(pid, pcat))
  y, x = rng.integers(0, h - 2, size=2)
  gt[y : y + 3, x : x + 4] = 0  # void
  # Keep only segments still visible after overlaps.
  gt_segs = [s for s in gt_segs if (gt == s["id"]).any()]
  pred_segs = [s for s in pred_segs if (pred == s["id"]).any()]
  for s in gt_segs:
    s["area"] = int((gt == s["id"]).sum())
  return gt, gt_segs, pred, pred_segs


def reference_stats(images, crowd="last"):
  """Per-category tp/fp/fn/iou from boolean masks.

  crowd: 'last' is panopticapi's rule (only the last crowd segment of the
  prediction's category listed in segments_info excuses it), 'merge' uses
  all crowd segments of the category.
  """
  stats = {c: [0, 0, 0, 0.0] for c in CATEGORIES}
  for gt, gt_segs, pred, pred_segs in images:
    void = gt == 0
    matched_gt, matched_pred = set(), set()
    for g in gt_segs:
      if g["iscrowd"]:
        continue
      gm = gt == g["id"]
      for p in pred_segs:
        if p["category_id"] != g["category_id"]:
          continue
        pm = pred == p["id"]
        inter = np.sum(gm & pm)
        union = np.sum(gm | pm) - np.sum(pm & void)
        if inter / union > 0.5:
          stats[g["category_id"]][0] += 1
          stats[g["category_id"]][3] += inter / union
          matched_gt.add(g["id"])
          matched_pred.add(p["id"])
    for g in gt_segs:
      if not g["iscrowd"] and g["id"] not in matched_gt:
        stats[g["category_id"]][2] += 1
    for p in pred_segs:
      if p["id"] in matched_pred:
        continue
      pm = pred == p["id"]
      crowds = [g["id"] for g in gt_segs
                if g["iscrowd"] and g["category_id"] == p["category_id"]]
      if crowd == "last":
        crowds = crowds[-1:]
      on_crowd = np.isin(gt, crowds)
      if np.sum(pm & (void | on_crowd)) / np.sum(pm) <= 0.5:
        stats[p["category_id"]][1] += 1
  return stats


def reference_average(stats, isthing):
  values = []
  for c, (tp, fp, fn, iou) in stats.items():
    if isthing is not None and CATEGORIES[c]["isthing"] != isthing:
      continue
    if tp + fp + fn:
      d = tp + 0.5 * fp + 0.5 * fn
      values.append((iou / d, iou / tp if tp else 0.0, tp / d))
  return np.mean(values, axis=0), len(values)


def write_dataset(root, images):
  gt_dir, pred_dir = root / "gt", root / "pred"
  gt_dir.mkdir()
  pred_dir.mkdir()
  gt_anns, pred_anns = [], []
  for i, (gt, gt_segs, pred, pred_segs) in enumerate(images):
    name = f"{i:04d}.png"
    Image.fromarray(coco_format.id_to_rgb(gt)).save(gt_dir / name)
    Image.fromarray(coco_format.id_to_rgb(pred)).save(pred_dir / name)
    gt_anns.append({"image_id": i, "file_name": name, "segments_info": gt_segs})
    # Wrong areas on purpose: they must be recounted.
    bad = [s | {"area": 1} for s in pred_segs]
    pred_anns.append({"image_id": i, "file_name": name, "segments_info": bad})
  (root / "gt.json").write_text(
    json.dumps(
      {"annotations": gt_anns, "categories": list(CATEGORIES.values())}
    )
  )
  # Predictions listed in reverse order: matching is by image_id.
  (root / "pred.json").write_text(json.dumps({"annotations": pred_anns[::-1]}))
  return root / "gt.json", root / "pred.json"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  rng = np.random.default_rng(0)
  images = [random_image(rng, 14, 18) for _ in range(6)]
  root = tmp_path_factory.mktemp("pq")
  return images, write_dataset(root, images)


@pytest.mark.parametrize("crowd", panoptic.CROWD_RULES)
def test_pq_compute_matches_numpy_reference(dataset, crowd):
  images, (gt_json, pred_json) = dataset
  # Default folders: the JSON paths without ".json".
  kwargs = {"merge_crowd": True} if crowd == "merge" else {}
  res = panoptic.pq_compute(str(gt_json), str(pred_json), **kwargs)
  stats = reference_stats(images, crowd)
  assert sum(s[0] for s in stats.values()) > 3  # the case has matches
  assert sum(s[1] + s[2] for s in stats.values()) > 3  # and errors
  for name, isthing in (("All", None), ("Things", 1), ("Stuff", 0)):
    (pq, sq, rq), n = reference_average(stats, isthing)
    assert res[name]["n"] == n
    np.testing.assert_allclose(
      [res[name]["pq"], res[name]["sq"], res[name]["rq"]],
      [pq, sq, rq],
      rtol=1e-12,
    )
  assert res["per_class"]["5"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def test_pq_compute_workers_and_cli_agree(dataset, tmp_path, capsys):
  _, (gt_json, pred_json) = dataset
  serial = panoptic.pq_compute(str(gt_json), str(pred_json))
  assert panoptic.pq_compute(str(gt_json), str(pred_json), num_workers=2) == (
    serial
  )
  out = tmp_path / "out" / "pq.json"
  rc = panoptic.main(
    [
      f"--gt_json_file={gt_json}",
      f"--pred_json_file={pred_json}",
      f"--gt_folder={gt_json.parent / 'gt'}",
      f"--pred_folder={pred_json.parent / 'pred'}",
      f"--output={out}",
    ]
  )
  assert rc == 0
  assert json.loads(out.read_text()) == serial
  lines = capsys.readouterr().out.splitlines()
  all_row = next(line for line in lines if line.startswith("All"))
  assert all_row.split("|")[1].split()[0] == f"{100 * serial['All']['pq']:.1f}"


def test_cli_error_is_one_line(dataset, tmp_path):
  _, (gt_json, pred_json) = dataset
  pred = json.loads(pred_json.read_text())
  bad = tmp_path / "pred.json"
  bad.write_text(json.dumps({"annotations": pred["annotations"][1:]}))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pix2seq_d_jax.evaluation.panoptic",
      f"--gt_json_file={gt_json}",
      f"--pred_json_file={bad}",
      f"--pred_folder={pred_json.parent / 'pred'}",
    ],
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    check=False,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    f"error: ValueError: {bad}: no prediction for image_id 5 (0005.png)"
  ]


# ------------------------------------- panopticapi's crowd rule by default


def _two_crowds_case(root):
  """Two crowd regions of one category (car) in one image, written as files.

  Ground truth (4 x 8; columns): 0-1 car crowd 11, 2-3 car crowd 12 (listed
  after 11), 4-5 person 21, 6-7 sky 31. Prediction: car 41 on crowd 11, car
  44 on crowd 12, person 42 on rows 0-2 of columns 4-5, sky 43 on columns
  6-7 plus row 3 of columns 4-5.
  """
  gt = np.zeros((4, 8), np.int64)
  gt[:, 0:2], gt[:, 2:4], gt[:, 4:6], gt[:, 6:8] = 11, 12, 21, 31
  gt_segs = [seg(11, 2, iscrowd=1, area=8), seg(12, 2, iscrowd=1, area=8),
             seg(21, 1, area=8), seg(31, 3, area=8)]
  pred = np.zeros((4, 8), np.int64)
  pred[:, 0:2], pred[:, 2:4], pred[:3, 4:6] = 41, 44, 42
  pred[:, 6:8], pred[3, 4:6] = 43, 43
  pred_segs = [seg(41, 2), seg(44, 2), seg(42, 1), seg(43, 3)]
  return write_dataset(root, [(gt, gt_segs, pred, pred_segs)])


def test_cli_default_is_panopticapi_with_two_crowds_of_one_category(tmp_path):
  gt_json, pred_json = _two_crowds_case(tmp_path)
  out = {rule: tmp_path / f"{rule}.json" for rule in ("default", "merge")}
  args = [f"--gt_json_file={gt_json}", f"--pred_json_file={pred_json}"]
  assert panoptic.main([*args, f"--output={out['default']}"]) == 0
  assert panoptic.main(
      [*args, "--crowd=merge", f"--output={out['merge']}"]) == 0
  default = json.loads(out["default"].read_text())
  merged = json.loads(out["merge"].read_text())
  # panopticapi keeps one crowd id per category, the last listed (12), so
  # car 41 (8 px, all on crowd 11, none on VOID) is a false positive: car
  # has tp 0, fp 1 -> PQ = SQ = RQ = 0 and is counted. Person: IoU 6 / 8,
  # PQ = SQ = 0.75, RQ = 1. Sky: IoU 8 / 10, PQ = SQ = 0.8, RQ = 1.
  expected = {
      "All": {"pq": 1.55 / 3, "sq": 1.55 / 3, "rq": 2 / 3, "n": 3},
      "Things": {"pq": 0.375, "sq": 0.375, "rq": 0.5, "n": 2},
      "Stuff": {"pq": 0.8, "sq": 0.8, "rq": 1.0, "n": 1},
  }
  for name, values in expected.items():
    assert default[name]["n"] == values["n"], name
    for key in ("pq", "sq", "rq"):
      assert default[name][key] == pytest.approx(values[key], abs=1e-12)
  assert default["per_class"]["2"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
  # The merge deviation excuses car 41 too: car drops out of the average.
  assert merged["All"]["n"] == 2 and merged["Things"]["n"] == 1
  assert merged["All"]["pq"] == pytest.approx(0.775, abs=1e-12)
  assert merged["All"]["rq"] == 1.0
  # The in-memory reference reproduces panopticapi's rule on the same case.
  stats = reference_stats([_two_crowds_arrays(tmp_path)], "last")
  assert stats[2][:3] == [0, 1, 0]


def _two_crowds_arrays(root):
  """The case of `_two_crowds_case` read back from its files."""
  gt_ann = json.loads((root / "gt.json").read_text())["annotations"][0]
  pred_ann = json.loads((root / "pred.json").read_text())["annotations"][0]
  return (coco_format.read_panoptic_png(root / "gt" / gt_ann["file_name"]),
          gt_ann["segments_info"],
          coco_format.read_panoptic_png(root / "pred" / pred_ann["file_name"]),
          pred_ann["segments_info"])
