"""Panoptic quality (PQ, SQ, RQ) with COCO panopticapi's `pq_compute` rules.

This module re-implements the definition used by the COCO panoptic API so that
numbers reported by pix2seq_d_jax are comparable with published ones: segments
of the same category match when IoU > 0.5, where the union leaves out the part
of the prediction lying on ground-truth VOID (id 0); crowd ground-truth
segments never match, and an unmatched prediction is a false positive unless
more than half of it lies on VOID or on crowd regions of its own category.
Prediction areas are recounted from the PNG, ground-truth areas are the JSON's
(as in panopticapi). `pq_single_image`, `PQStat` and `summarize` are the
in-memory building blocks the trainer uses; `pq_compute` evaluates a COCO-format
folder of PNGs plus JSON, and `python -m pix2seq_d_jax.evaluation.panoptic`
is the command line with panopticapi's flags. By default every rule is
panopticapi's, including its crowd rule: when an image has several crowd
segments of one category, only the last one listed excuses predictions of that
category. One deviation is available as an option: `merge_crowd=True` (CLI
`--crowd merge`, evaluator field `crowd='merge'`) uses all crowd segments of
the category, which changes results only on images with more than one (COCO
has at most one per category). One difference is unconditional, on an input
panopticapi cannot handle: an average over zero categories is 0.0 with n = 0
(panopticapi divides by zero).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from pix2seq_d_jax.evaluation import cli
from pix2seq_d_jax.formats import coco_panoptic as coco_format

VOID = 0
# Crowd rules: 'last' is panopticapi's, 'merge' the deviation
# (`merge_crowd=True`). The CLI's --crowd and the evaluators' `crowd` field.
CROWD_RULES = ("last", "merge")
# Ids are RGB-encoded in COCO PNGs, so they stay below 256**3; the in-memory API
# accepts anything below 2**31 so the pair code gt * (max_pred + 1) + pred fits
# in int64.
_MAX_ID = 2**31 - 1


@dataclasses.dataclass
class PQStatCat:
  """Accumulators of one category: summed IoU of matches and exact counts."""

  iou: float = 0.0
  tp: int = 0
  fp: int = 0
  fn: int = 0

  def __iadd__(self, other: PQStatCat) -> PQStatCat:
    self.iou += other.iou
    self.tp += other.tp
    self.fp += other.fp
    self.fn += other.fn
    return self


class PQStat:
  """Per-category PQ accumulators; `+=` merges images, hosts or workers."""

  def __init__(self):
    self.pq_per_cat: collections.defaultdict[int, PQStatCat] = (
      collections.defaultdict(PQStatCat)
    )

  def __getitem__(self, category_id: int) -> PQStatCat:
    return self.pq_per_cat[int(category_id)]

  def __iadd__(self, other: PQStat) -> PQStat:
    for category_id, stat in other.pq_per_cat.items():
      self.pq_per_cat[category_id] += stat
    return self

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, PQStat):
      return NotImplemented
    empty = PQStatCat()
    keys = set(self.pq_per_cat) | set(other.pq_per_cat)
    return all(
      self.pq_per_cat.get(k, empty) == other.pq_per_cat.get(k, empty)
      for k in keys
    )

  def __repr__(self) -> str:
    return f"PQStat({dict(sorted(self.pq_per_cat.items()))})"

  def to_array(self, category_ids: Sequence[int]) -> np.ndarray:
    """Packs the stats for summing across hosts.

    Args:
      category_ids: the categories to pack, in a fixed order.

    Returns:
      float64 [len(category_ids), 4] rows (tp, fp, fn, iou); counts are exact
      in float64 up to 2**53.
    """
    return np.array(
      [
        (s.tp, s.fp, s.fn, s.iou)
        for s in (
          self.pq_per_cat.get(int(c), PQStatCat()) for c in category_ids
        )
      ],
      dtype=np.float64,
    ).reshape(len(category_ids), 4)

  @classmethod
  def from_array(cls, category_ids: Sequence[int], array: np.ndarray) -> PQStat:
    """Inverse of `to_array` (array: float64 [len(category_ids), 4])."""
    array = np.asarray(array, dtype=np.float64)
    if array.shape != (len(category_ids), 4):
      raise ValueError(
        f"array: expected shape ({len(category_ids)}, 4), got {array.shape}"
      )
    stat = cls()
    for c, (tp, fp, fn, iou) in zip(category_ids, array, strict=True):
      stat.pq_per_cat[int(c)] = PQStatCat(float(iou), int(tp), int(fp), int(fn))
    return stat

  def pq_average(
    self, categories: Mapping[int, Mapping[str, Any]], isthing: bool | None
  ) -> tuple[dict[str, float | int], dict[int, dict[str, float]]]:
    """Averages PQ/SQ/RQ over the categories that occur, as panopticapi does.

    Args:
      categories: category id -> info with an `isthing` field (0 or 1).
      isthing: True for things only, False for stuff only, None for all.

    Returns:
      ({'pq', 'sq', 'rq', 'n'}, {category_id: {'pq', 'sq', 'rq'}}). A category
      with tp + fp + fn = 0 is left out of the average and reported as zeros;
      sq of a category without true positives is 0. With n = 0 the averages
      are 0.0.
    """
    pq = sq = rq = 0.0
    n = 0
    per_class = {}
    for category_id, info in categories.items():
      if isthing is not None and (info["isthing"] == 1) != isthing:
        continue
      stat = self.pq_per_cat.get(int(category_id), PQStatCat())
      if stat.tp + stat.fp + stat.fn == 0:
        per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        continue
      n += 1
      denominator = stat.tp + 0.5 * stat.fp + 0.5 * stat.fn
      pq_class = stat.iou / denominator
      sq_class = stat.iou / stat.tp if stat.tp else 0.0
      rq_class = stat.tp / denominator
      per_class[category_id] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
      pq += pq_class
      sq += sq_class
      rq += rq_class
    if n == 0:
      return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def _segments_by_id(
  segments: Sequence[Mapping[str, Any]], what: str
) -> dict[int, Mapping[str, Any]]:
  by_id = {}
  for i, segment in enumerate(segments):
    for field in ("id", "category_id"):
      if field not in segment:
        raise ValueError(f"{what}: segments_info[{i}] has no {field!r}")
    segment_id = int(segment["id"])
    if segment_id in by_id:
      raise ValueError(f"{what}: segment id {segment_id} is listed twice")
    by_id[segment_id] = segment
  return by_id


def _check_id_map(ids: np.ndarray, what: str) -> np.ndarray:
  return coco_format.check_id_map(ids, what, max_id=_MAX_ID).astype(np.int64)


def pq_single_image(
  gt_ids: np.ndarray,
  gt_segments: Sequence[Mapping[str, Any]],
  pred_ids: np.ndarray,
  pred_segments: Sequence[Mapping[str, Any]],
  categories: Mapping[int, Mapping[str, Any]],
  *,
  image_name: str = "image",
  use_gt_json_area: bool = True,
  merge_crowd: bool = False,
) -> PQStat:
  """Matches one image's predicted segments to its ground truth.

  Args:
    gt_ids: int [h, w] ground-truth segment ids; 0 is VOID. Ids without an
      entry in `gt_segments` are ignored (neither VOID nor matchable), as in
      panopticapi.
    gt_segments: dicts with `id`, `category_id`, `iscrowd` (default 0) and
      optionally `area`.
    pred_ids: int [h, w] predicted segment ids; 0 is unlabelled.
    pred_segments: dicts with `id` and `category_id`; any `area` is ignored
      and recounted from `pred_ids`.
    categories: category id -> info (`isthing`); predictions must use these.
    image_name: names the image in error messages.
    use_gt_json_area: take ground-truth areas from `gt_segments[i]['area']`
      (panopticapi); when False, or when `area` is absent, they are counted
      in `gt_ids`. Pass False when `gt_ids` was resized.
    merge_crowd: False (default, panopticapi's code): an unmatched
      prediction is excused by the last crowd segment of its category listed
      in `gt_segments`; True (a deviation): by all of them. Identical with
      at most one crowd segment per category, the COCO convention.

  Returns:
    The image's `PQStat`.

  Raises:
    ValueError: if the maps differ in shape or hold invalid ids, a predicted
      id is in the map but not in `pred_segments` (or the reverse), a
      predicted category is unknown, or an id is listed twice.
  """
  gt_ids = _check_id_map(gt_ids, f"{image_name}: ground-truth map")
  pred_ids = _check_id_map(pred_ids, f"{image_name}: prediction map")
  if gt_ids.shape != pred_ids.shape:
    raise ValueError(
      f"{image_name}: ground truth is {gt_ids.shape[0]}x{gt_ids.shape[1]} but "
      f"the prediction is {pred_ids.shape[0]}x{pred_ids.shape[1]} (h x w)"
    )
  gt_segms = _segments_by_id(gt_segments, f"{image_name} ground truth")
  pred_segms = _segments_by_id(pred_segments, f"{image_name} prediction")
  if VOID in pred_segms:
    raise ValueError(
      f"{image_name}: prediction segments_info lists id {VOID}, which is "
      "reserved for unlabelled pixels"
    )

  # Prediction areas come from the map, never from the JSON.
  pred_area = {}
  labels, counts = np.unique(pred_ids, return_counts=True)
  for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
    if label == VOID:
      continue
    if label not in pred_segms:
      raise ValueError(
        f"{image_name}: segment id {label} is in the prediction PNG but not "
        "in its segments_info"
      )
    category_id = pred_segms[label]["category_id"]
    if category_id not in categories:
      raise ValueError(
        f"{image_name}: prediction segment {label} has category_id "
        f"{category_id}, which is not among the categories "
        f"{sorted(categories)}"
      )
    pred_area[label] = count
  missing = sorted(set(pred_segms) - set(pred_area))
  if missing:
    raise ValueError(
      f"{image_name}: segment ids {missing} are in the prediction "
      "segments_info but not in its PNG"
    )

  # Pixel counts of every (gt id, pred id) pair, in panopticapi's order.
  offset = int(pred_ids.max()) + 1 if pred_ids.size else 1
  pair_codes, counts = np.unique(gt_ids * offset + pred_ids, return_counts=True)
  intersections = {
    (g, p): c
    for g, p, c in zip(
      (pair_codes // offset).tolist(),
      (pair_codes % offset).tolist(),
      counts.tolist(),
      strict=True,
    )
  }
  gt_area_map = collections.Counter()
  for (g, _), c in intersections.items():
    gt_area_map[g] += c

  def gt_area(gt_id):
    if use_gt_json_area and "area" in gt_segms[gt_id]:
      return gt_segms[gt_id]["area"]
    return gt_area_map[gt_id]

  stat = PQStat()
  gt_matched, pred_matched = set(), set()
  for (gt_id, pred_id), intersection in intersections.items():
    if gt_id not in gt_segms or pred_id not in pred_segms:
      continue
    gt_info = gt_segms[gt_id]
    if gt_info.get("iscrowd", 0) == 1:
      continue
    if gt_info["category_id"] != pred_segms[pred_id]["category_id"]:
      continue
    union = (
      pred_area[pred_id]
      + gt_area(gt_id)
      - intersection
      - intersections.get((VOID, pred_id), 0)
    )
    iou = intersection / union
    if iou > 0.5:
      stat[gt_info["category_id"]].tp += 1
      stat[gt_info["category_id"]].iou += iou
      gt_matched.add(gt_id)
      pred_matched.add(pred_id)

  crowd_ids = collections.defaultdict(list)
  for gt_id, gt_info in gt_segms.items():
    if gt_id in gt_matched:
      continue
    if gt_info.get("iscrowd", 0) == 1:
      if merge_crowd:
        crowd_ids[gt_info["category_id"]].append(gt_id)
      else:
        # panopticapi's dict keeps one crowd id per category: the last.
        crowd_ids[gt_info["category_id"]] = [gt_id]
      continue
    stat[gt_info["category_id"]].fn += 1

  for pred_id, pred_info in pred_segms.items():
    if pred_id in pred_matched:
      continue
    ignored = intersections.get((VOID, pred_id), 0)
    for crowd_id in crowd_ids.get(pred_info["category_id"], ()):
      ignored += intersections.get((crowd_id, pred_id), 0)
    # Strictly more than half on VOID/crowd: exactly half is still an FP.
    if ignored / pred_area[pred_id] > 0.5:
      continue
    stat[pred_info["category_id"]].fp += 1
  return stat


def summarize(
  pq_stat: PQStat, categories: Mapping[int, Mapping[str, Any]]
) -> dict[str, Any]:
  """Turns accumulated stats into panopticapi's result dictionary.

  Args:
    pq_stat: stats summed over the evaluated images.
    categories: category id -> info with `isthing`.

  Returns:
    {'All'|'Things'|'Stuff': {'pq', 'sq', 'rq', 'n'}, 'per_class':
    {str(category_id): {'pq', 'sq', 'rq'}}}, values as fractions (float64),
    n the number of categories that occur.
  """
  results = {}
  for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
    average, per_class = pq_stat.pq_average(categories, isthing)
    results[name] = {
      "pq": float(average["pq"]),
      "sq": float(average["sq"]),
      "rq": float(average["rq"]),
      "n": int(average["n"]),
    }
    if isthing is None:
      results["per_class"] = {
        str(c): {k: float(v) for k, v in r.items()}
        for c, r in per_class.items()
      }
  return results


def _load_json(path: str, fields: Sequence[str]) -> dict[str, Any]:
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  for field in fields:
    if not isinstance(data, dict) or field not in data:
      raise ValueError(f"{path}: missing top-level field {field!r}")
  return data


def _check_annotations(data: Mapping[str, Any], path: str) -> None:
  for i, ann in enumerate(data["annotations"]):
    for field in ("image_id", "file_name", "segments_info"):
      if field not in ann:
        raise ValueError(f"{path}: annotations[{i}] has no {field!r}")


def _evaluate_chunk(
  pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
  gt_folder: str,
  pred_folder: str,
  categories: Mapping[int, Mapping[str, Any]],
  merge_crowd: bool,
) -> list[PQStat]:
  """Evaluates (gt annotation, pred annotation) pairs; one PQStat per image."""
  stats = []
  for gt_ann, pred_ann in pairs:
    gt_path = os.path.join(gt_folder, gt_ann["file_name"])
    pred_path = os.path.join(pred_folder, pred_ann["file_name"])
    stats.append(
      pq_single_image(
        coco_format.read_panoptic_png(gt_path),
        gt_ann["segments_info"],
        coco_format.read_panoptic_png(pred_path),
        pred_ann["segments_info"],
        categories,
        image_name=f"image_id {gt_ann['image_id']} ({pred_path})",
        merge_crowd=merge_crowd,
      )
    )
  return stats


def _evaluate_chunk_star(args):
  return _evaluate_chunk(*args)


def _strip_json(path: str) -> str:
  return path[: -len(".json")] if path.endswith(".json") else path


def pq_compute(
  gt_json_file: str,
  pred_json_file: str,
  gt_folder: str | None = None,
  pred_folder: str | None = None,
  num_workers: int = 1,
  *,
  merge_crowd: bool = False,
) -> dict[str, Any]:
  """Evaluates COCO-format panoptic predictions against ground truth.

  Every ground-truth image (by `image_id`) must have a prediction; extra
  predictions are ignored. Per-image stats are summed in ground-truth order,
  so any `num_workers` gives bit-identical results.

  Args:
    gt_json_file: COCO panoptic JSON with `annotations` and `categories`.
    pred_json_file: JSON with `annotations` (`image_id`, `file_name`,
      `segments_info`).
    gt_folder: folder of ground-truth PNGs; default `gt_json_file` without
      `.json` (as panopticapi).
    pred_folder: folder of predicted PNGs; default likewise.
    num_workers: processes; > 1 uses a spawn-context multiprocessing Pool over
      contiguous chunks of images.
    merge_crowd: see `pq_single_image`.

  Returns:
    The dictionary of `summarize`.

  Raises:
    ValueError: malformed JSON, a ground-truth image without prediction, or
      any per-image error of `pq_single_image` (which names the file).
    FileNotFoundError: a missing JSON file or PNG folder.
  """
  if not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
  start = time.time()
  gt_json = _load_json(gt_json_file, ("annotations", "categories"))
  pred_json = _load_json(pred_json_file, ("annotations",))
  _check_annotations(gt_json, gt_json_file)
  _check_annotations(pred_json, pred_json_file)
  gt_folder = gt_folder or _strip_json(gt_json_file)
  pred_folder = pred_folder or _strip_json(pred_json_file)
  for name, folder in (("gt_folder", gt_folder), ("pred_folder", pred_folder)):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{name}: folder {folder} does not exist")
  categories = {int(c["id"]): c for c in gt_json["categories"]}
  logging.info(
    "PQ: ground truth %s (%s), prediction %s (%s)",
    gt_json_file,
    gt_folder,
    pred_json_file,
    pred_folder,
  )

  pred_by_image = {a["image_id"]: a for a in pred_json["annotations"]}
  pairs = []
  for gt_ann in gt_json["annotations"]:
    image_id = gt_ann["image_id"]
    if image_id not in pred_by_image:
      raise ValueError(
        f"{pred_json_file}: no prediction for image_id {image_id} "
        f"({gt_ann.get('file_name')})"
      )
    pairs.append((gt_ann, pred_by_image[image_id]))

  num_chunks = min(num_workers, len(pairs))
  if num_chunks <= 1:
    per_image = _evaluate_chunk(
      pairs, gt_folder, pred_folder, categories, merge_crowd
    )
  else:
    bounds = np.linspace(0, len(pairs), num_chunks + 1).astype(int)
    jobs = [
      (pairs[a:b], gt_folder, pred_folder, categories, merge_crowd)
      for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    # spawn, not fork: the caller may be a multithreaded JAX process.
    with multiprocessing.get_context("spawn").Pool(num_chunks) as pool:
      per_image = [
        s for chunk in pool.map(_evaluate_chunk_star, jobs) for s in chunk
      ]

  total = PQStat()
  for stat in per_image:
    total += stat
  results = summarize(total, categories)
  logging.info(
    "PQ over %d images in %.2f s: %s",
    len(pairs),
    time.time() - start,
    {k: v for k, v in results.items() if k != "per_class"},
  )
  return results


def format_table(results: Mapping[str, Any]) -> str:
  """Formats All/Things/Stuff rows in percent, like panopticapi's print."""
  lines = [
    "{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"),
    "-" * (10 + 7 * 4),
  ]
  for name in ("All", "Things", "Stuff"):
    r = results[name]
    lines.append(
      "{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
        name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], r["n"]
      )
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point; returns the process exit code."""
  parser = argparse.ArgumentParser(
    description="COCO panoptic quality (panopticapi pq_compute semantics)."
  )
  parser.add_argument("--gt_json_file", required=True)
  parser.add_argument("--pred_json_file", required=True)
  parser.add_argument("--gt_folder", default=None)
  parser.add_argument("--pred_folder", default=None)
  parser.add_argument("--output", default=None, help="write results JSON here")
  parser.add_argument("--num_workers", type=int, default=1)
  parser.add_argument(
    "--crowd",
    choices=CROWD_RULES,
    default="last",
    help="which crowd segments excuse an unmatched prediction of their "
    "category: 'last' listed (panopticapi's code, the default) or 'merge' "
    "all of them (a deviation; differs only with several crowd segments of "
    "one category in an image)",
  )
  args = parser.parse_args(argv)
  return cli.run_scorer(
    lambda: pq_compute(
      args.gt_json_file,
      args.pred_json_file,
      gt_folder=args.gt_folder,
      pred_folder=args.pred_folder,
      num_workers=args.num_workers,
      merge_crowd=args.crowd == "merge",
    ),
    args.output,
    format_table,
  )


if __name__ == "__main__":
  # Run the importable copy of this module so Pool workers (spawn) pickle
  # functions and PQStat by their package path, not by `__main__`.
  from pix2seq_d_jax.evaluation import panoptic as _panoptic

  sys.exit(_panoptic.main())
