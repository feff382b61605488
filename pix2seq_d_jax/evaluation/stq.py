"""Segmentation and Tracking Quality (STQ) with deeplab2's STQuality rules.

STQ (Weber et al. 2021, "STEP: Segmenting and Tracking Every Pixel") is the
KITTI-STEP metric: STQ = sqrt(AQ * SQ). This module re-implements deeplab2's
`evaluation/numpy/segmentation_and_tracking_quality.py` (identical to its TF
version and to the STEP devkit) rule for rule, so that numbers are comparable
with published ones:

- Labels are panoptic ids `semantic * max_instances_per_category + instance`.
- SQ ("IoU" in deeplab2) is the mean class IoU of one confusion matrix summed
  over all frames of all sequences. An `ignore_label` >= num_classes is
  mapped to an extra row/column `num_classes`. Ground-truth ignore pixels
  (the ignore row) are dropped; predicted ignore pixels are NOT: on labelled
  pixels they are false negatives of the true class, and they give the
  ignore column a union > 0 and an intersection of 0, so the mean then
  averages over one more class with IoU 0 (deeplab2's quirk, kept). Classes
  with an empty union (no ground truth, no prediction) are left out.
- AQ tracks only pixels of the `things` classes. A ground-truth thing pixel
  with instance 0 is crowd: it belongs to no track, and prediction pixels on
  it are not counted either. Tracks and predicted tubes are keyed by the full
  panoptic id, per sequence, so the same id in two sequences gives two
  tracks and a class error splits a tube. Every other prediction pixel of a
  thing class belongs to its tube, including pixels on ground-truth stuff or
  void and predicted instance 0 (one tube per class); those enlarge |p|.
  Intersections are class-agnostic: a ground-truth car pixel predicted as
  person with a consistent id counts for the track (the class error is SQ's
  business). Ground-truth thing pixels predicted as stuff count in |g| only.
- For track g of a sequence: (1 / |g|) * sum over tubes p with TPA(p, g) > 0
  of TPA * TPA / (|p| + |g| - TPA). AQ = sum over all tracks of all sequences
  / total track count; per-sequence AQ divides by that sequence's count.
  Zero tracks give AQ 0.

Counts are exact int64 (deeplab2's numpy version accumulates float32 counts,
which round above 2**24 pixels per tube). One deliberate difference: a mean
IoU over zero classes (a sequence whose ground truth is all ignore) is 0.0,
where deeplab2 divides 0 by 0. `python -m pix2seq_d_jax.evaluation.stq`
scores a folder of STEP-format prediction PNGs against KITTI-STEP ground truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from pix2seq_d_jax.evaluation import cli
from pix2seq_d_jax.formats import kitti_step as step_format

# KITTI-STEP as deeplab2 evaluates it: 19 Cityscapes train ids, person (11)
# and car (13) tracked, void 255, panoptic label divisor 1000.
KITTI_STEP_NUM_CLASSES = 19
KITTI_STEP_THINGS = (11, 13)
KITTI_STEP_IGNORE_LABEL = 255
KITTI_STEP_MAX_INSTANCES = 1000
KITTI_STEP_OFFSET = 256**3


@dataclasses.dataclass
class _SequenceStats:
  """Exact counts of one sequence."""

  confusion: np.ndarray  # int64 [n, n], rows ground truth, columns prediction
  gt_area: dict[int, int]  # panoptic id -> pixels of the track
  pred_area: dict[int, int]  # panoptic id -> pixels of the tube
  intersection: dict[int, int]  # gt id * offset + pred id -> pixels
  length: int = 0


def _add_counts(stats: dict[int, int], ids: np.ndarray) -> None:
  uniq, counts = np.unique(ids, return_counts=True)
  for key, count in zip(uniq.tolist(), counts.tolist(), strict=True):
    stats[key] = stats.get(key, 0) + count


def _mean_iou(confusion: np.ndarray) -> float:
  """Mean IoU over classes with a non-empty union (0.0 when there are none)."""
  tp = np.diagonal(confusion).astype(np.float64)
  unions = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
  present = unions > 0
  if not present.any():
    return 0.0
  return float(np.sum(tp[present] / unions[present]) / present.sum())


class StqAccumulator:
  """Accumulates STQ statistics frame by frame, per sequence.

  Example:
    acc = kitti_step_accumulator()  # or StqAccumulator(...) explicitly
    for each frame: acc.update(gt_sem, gt_inst, pred_sem, pred_inst, seq)
    acc.result()['STQ']

  The object is picklable, `merge` joins accumulators that saw disjoint
  sequences (one per process or host), and `sequence_state` /
  `add_sequence_state` move one sequence's counts through JSON.
  """

  def __init__(
      self,
      num_classes: int,
      things: Sequence[int],
      ignore_label: int,
      max_instances_per_category: int,
      offset: int,
  ):
    """Sets up an empty accumulator.

    Args:
      num_classes: classes 0..num_classes-1 (without the ignore label).
      things: the tracked class ids.
      ignore_label: class id of void pixels; may lie outside
        [0, num_classes) (255 for KITTI-STEP) or inside it (e.g. 0 with the
        classes shifted by one).
      max_instances_per_category: instance ids are < this; the panoptic id is
        `semantic * max_instances_per_category + instance`.
      offset: the intersection key is `gt_id * offset + pred_id`; must be at
        least `num_classes * max_instances_per_category` (as deeplab2).

    Raises:
      ValueError: on an invalid argument (names it and the expectation).
    """
    if num_classes < 1:
      raise ValueError(f'num_classes={num_classes}: expected >= 1.')
    things = tuple(int(t) for t in things)
    if any(not 0 <= t < num_classes or t == ignore_label for t in things):
      raise ValueError(
          f'things={things}: expected class ids in [0, {num_classes}) other '
          f'than ignore_label={ignore_label}.'
      )
    if ignore_label < 0:
      raise ValueError(f'ignore_label={ignore_label}: expected >= 0.')
    if max_instances_per_category < 1:
      raise ValueError(
          f'max_instances_per_category={max_instances_per_category}: '
          'expected >= 1.'
      )
    lower = num_classes * max_instances_per_category
    if offset < lower:
      raise ValueError(
          f'offset={offset}: expected >= num_classes * '
          f'max_instances_per_category = {lower}.'
      )
    if lower * offset >= 2**63:
      raise ValueError(
          f'offset={offset}: gt_id * offset must fit in int64 for thing ids '
          f'below {lower}.'
      )
    self.num_classes = num_classes
    self.things = things
    self.ignore_label = ignore_label
    self.max_instances_per_category = max_instances_per_category
    self.offset = offset
    # deeplab2 gives an ignore label >= num_classes its own row/column at
    # index num_classes; one inside the range uses its own index.
    if ignore_label >= num_classes:
      self._size, self._ignore_index = num_classes + 1, num_classes
    else:
      self._size, self._ignore_index = num_classes, ignore_label
    self._sequences: dict[Hashable, _SequenceStats] = {}

  def __repr__(self) -> str:
    return (
        f'StqAccumulator(num_classes={self.num_classes}, '
        f'things={self.things}, ignore_label={self.ignore_label}, '
        f'sequences={len(self._sequences)})'
    )

  @property
  def sequence_ids(self) -> list[Hashable]:
    """Sequence ids in the order they were first seen."""
    return list(self._sequences)

  def _check(self, name: str, x: np.ndarray, semantic: bool) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f'{name}: expected an integer map, got {x.dtype}.')
    x = x.astype(np.int64)
    if semantic:
      bad = ((x < 0) | (x >= self.num_classes)) & (x != self.ignore_label)
      expected = (
          f'class ids in [0, {self.num_classes}) or ignore_label '
          f'{self.ignore_label}'
      )
    else:
      bad = (x < 0) | (x >= self.max_instances_per_category)
      expected = f'instance ids in [0, {self.max_instances_per_category})'
    if bad.any():
      raise ValueError(
          f'{name}: expected {expected}, got {np.unique(x[bad])[:5].tolist()}.'
      )
    return x

  def update(
      self,
      gt_sem: np.ndarray,
      gt_inst: np.ndarray,
      pred_sem: np.ndarray,
      pred_inst: np.ndarray,
      sequence_id: Hashable = 0,
  ) -> None:
    """Adds one frame of sequence `sequence_id`.

    Args:
      gt_sem: integer [h, w] ground-truth class ids (or ignore_label).
      gt_inst: integer [h, w] ground-truth track ids; 0 on a thing class is
        crowd; ignored on other classes.
      pred_sem: integer [h, w] predicted class ids (may be ignore_label).
      pred_inst: integer [h, w] predicted track ids.
      sequence_id: any hashable; frames of one sequence share it.

    Raises:
      ValueError: on shape mismatch or ids out of range (names the argument).
    """
    maps = dict(
        gt_sem=gt_sem, gt_inst=gt_inst, pred_sem=pred_sem, pred_inst=pred_inst
    )
    shapes = {k: np.shape(v) for k, v in maps.items()}
    if len(set(shapes.values())) != 1:
      raise ValueError(f'update: maps differ in shape: {shapes}.')
    gs = self._check('gt_sem', gt_sem, True).ravel()
    gi = self._check('gt_inst', gt_inst, False).ravel()
    ps = self._check('pred_sem', pred_sem, True).ravel()
    pi = self._check('pred_inst', pred_inst, False).ravel()

    stats = self._sequences.get(sequence_id)
    if stats is None:
      stats = _SequenceStats(
          confusion=np.zeros((self._size, self._size), np.int64),
          gt_area={}, pred_area={}, intersection={},
      )
      self._sequences[sequence_id] = stats
    stats.length += 1

    n = self._size
    g_idx = np.where(gs == self.ignore_label, self._ignore_index, gs)
    p_idx = np.where(ps == self.ignore_label, self._ignore_index, ps)
    stats.confusion += np.bincount(
        g_idx * n + p_idx, minlength=n * n
    ).reshape(n, n)

    m = self.max_instances_per_category
    gt_id, pred_id = gs * m + gi, ps * m + pi
    gt_thing = np.isin(gs, self.things)
    pred_thing = np.isin(ps, self.things)
    # Crowd: ground-truth thing pixels without a track id. They are left out
    # of the tracks and of the predicted tubes alike.
    crowd = gt_thing & (gi == 0)
    gt_mask = gt_thing & ~crowd
    pred_mask = pred_thing & ~crowd
    both = gt_mask & pred_mask
    _add_counts(stats.gt_area, gt_id[gt_mask])
    _add_counts(stats.pred_area, pred_id[pred_mask])
    _add_counts(stats.intersection, gt_id[both] * self.offset + pred_id[both])

  def merge(self, other: StqAccumulator) -> None:
    """Adds the sequences of `other` (same settings, disjoint sequences).

    Raises:
      ValueError: if settings differ or a sequence is in both.
    """
    mine = (self.num_classes, self.things, self.ignore_label,
            self.max_instances_per_category, self.offset)
    theirs = (other.num_classes, other.things, other.ignore_label,
              other.max_instances_per_category, other.offset)
    if mine != theirs:
      raise ValueError(f'merge: settings differ: {mine} vs {theirs}.')
    shared = set(self._sequences) & set(other._sequences)
    if shared:
      raise ValueError(
          f'merge: sequences {sorted(map(str, shared))[:5]} are in both '
          'accumulators.'
      )
    for key, stats in other._sequences.items():
      self._sequences[key] = dataclasses.replace(
          stats,
          confusion=stats.confusion.copy(),
          gt_area=dict(stats.gt_area),
          pred_area=dict(stats.pred_area),
          intersection=dict(stats.intersection),
      )

  def sequence_state(self, sequence_id: Hashable) -> dict[str, Any]:
    """One sequence's exact counts as JSON-serialisable lists.

    What an evaluator gathers over processes (`add_sequence_state` is the
    inverse); ints stay exact through JSON.

    Raises:
      KeyError: for a sequence never updated.
    """
    stats = self._sequences[sequence_id]
    return {
        'length': stats.length,
        'confusion': stats.confusion.tolist(),
        'gt_area': sorted(stats.gt_area.items()),
        'pred_area': sorted(stats.pred_area.items()),
        'intersection': sorted(stats.intersection.items()),
    }

  def add_sequence_state(
      self, sequence_id: Hashable, state: Mapping[str, Any]
  ) -> None:
    """Adds a sequence exported by `sequence_state` (same settings).

    Raises:
      ValueError: if the sequence is already here or the confusion matrix
        has another size (other settings).
    """
    if sequence_id in self._sequences:
      raise ValueError(
          f'add_sequence_state: sequence {sequence_id!r} is already here.')
    confusion = np.asarray(state['confusion'], np.int64)
    if confusion.shape != (self._size, self._size):
      raise ValueError(
          f'add_sequence_state: confusion of shape {confusion.shape}, '
          f'expected {(self._size, self._size)} (other settings?).')

    def counts(pairs):
      return {int(k): int(v) for k, v in pairs}

    self._sequences[sequence_id] = _SequenceStats(
        confusion=confusion,
        gt_area=counts(state['gt_area']),
        pred_area=counts(state['pred_area']),
        intersection=counts(state['intersection']),
        length=int(state['length']),
    )

  def _association(self, stats: _SequenceStats) -> float:
    """Sum over tracks g of (1/|g|) sum_p TPA^2 / (|p| + |g| - TPA)."""
    inner: dict[int, float] = {}
    # Sorted: the float sums do not depend on the order pixels were seen,
    # so counts that travelled through `sequence_state` give equal results.
    for key, tpa in sorted(stats.intersection.items()):
      g, p = divmod(key, self.offset)
      union = stats.pred_area[p] + stats.gt_area[g] - tpa
      inner[g] = inner.get(g, 0.0) + tpa * (tpa / union)
    return float(
        sum(value / stats.gt_area[g] for g, value in inner.items())
    )

  def result(self) -> dict[str, Any]:
    """Computes STQ from everything added so far.

    Returns:
      deeplab2's keys, plus 'SQ' (the paper's name of 'IoU'):
        'STQ', 'AQ', 'IoU', 'SQ': float over all sequences;
        'STQ_per_seq', 'AQ_per_seq', 'IoU_per_seq': lists of float;
        'ID_per_seq': the sequence ids; 'Length_per_seq': frames per
        sequence; all lists in first-seen order.
    """
    total = np.zeros((self._size, self._size), np.int64)
    aq_sum, tracks = 0.0, 0
    aq_seq, iou_seq, ids, lengths = [], [], [], []
    for key, stats in self._sequences.items():
      confusion = stats.confusion.copy()
      # Ground-truth ignore pixels do not count (the prediction there may be
      # anything); predicted ignore on labelled pixels does.
      confusion[self._ignore_index, :] = 0
      total += confusion
      association = self._association(stats)
      aq_sum += association
      tracks += len(stats.gt_area)
      aq_seq.append(association / len(stats.gt_area) if stats.gt_area else 0.0)
      iou_seq.append(_mean_iou(confusion))
      ids.append(key)
      lengths.append(stats.length)
    aq = aq_sum / tracks if tracks else 0.0
    iou = _mean_iou(total)
    return {
        'STQ': float(np.sqrt(aq * iou)),
        'AQ': float(aq),
        'IoU': iou,
        'SQ': iou,
        'STQ_per_seq': [
            float(np.sqrt(a * s)) for a, s in zip(aq_seq, iou_seq, strict=True)
        ],
        'AQ_per_seq': aq_seq,
        'IoU_per_seq': iou_seq,
        'ID_per_seq': ids,
        'Length_per_seq': lengths,
    }


def kitti_step_accumulator() -> StqAccumulator:
  """An accumulator with KITTI-STEP's settings (train ids, void 255)."""
  return StqAccumulator(
      KITTI_STEP_NUM_CLASSES,
      KITTI_STEP_THINGS,
      KITTI_STEP_IGNORE_LABEL,
      KITTI_STEP_MAX_INSTANCES,
      KITTI_STEP_OFFSET,
  )


def _list_pngs(folder: str) -> list[str]:
  return sorted(f for f in os.listdir(folder) if f.endswith('.png'))


def _evaluate_sequence(
    gt_folder: str, pred_folder: str, sequence: str,
    settings: tuple[int, tuple[int, ...], int, int, int],
) -> StqAccumulator:
  """Scores one sequence folder; every ground-truth frame needs a PNG."""
  acc = StqAccumulator(*settings)
  gt_dir = os.path.join(gt_folder, sequence)
  pred_dir = os.path.join(pred_folder, sequence)
  if not os.path.isdir(pred_dir):
    raise FileNotFoundError(
        f'pred_folder: no folder for sequence {sequence!r}: {pred_dir}'
    )
  for name in _list_pngs(gt_dir):
    pred_path = os.path.join(pred_dir, name)
    if not os.path.isfile(pred_path):
      raise FileNotFoundError(f'pred_folder: prediction missing: {pred_path}')
    gt_sem, gt_inst = step_format.read_step_png(os.path.join(gt_dir, name))
    pred_sem, pred_inst = step_format.read_step_png(pred_path)
    if gt_sem.shape != pred_sem.shape:
      raise ValueError(
          f'{pred_path}: size {pred_sem.shape}, ground truth {gt_sem.shape}.'
      )
    try:
      acc.update(gt_sem, gt_inst, pred_sem, pred_inst, sequence)
    except ValueError as e:
      raise ValueError(f'{pred_path} vs ground truth: {e}') from e
  return acc


def _evaluate_sequence_star(args):
  return _evaluate_sequence(*args)


def stq_compute(
    gt_folder: str,
    pred_folder: str,
    *,
    num_workers: int = 1,
    num_classes: int = KITTI_STEP_NUM_CLASSES,
    things: Sequence[int] = KITTI_STEP_THINGS,
    ignore_label: int = KITTI_STEP_IGNORE_LABEL,
    max_instances_per_category: int = KITTI_STEP_MAX_INSTANCES,
    offset: int = KITTI_STEP_OFFSET,
) -> dict[str, Any]:
  """Scores STEP-format prediction PNGs against ground-truth PNGs.

  Both folders hold one sub-folder per sequence with one PNG per frame in
  the STEP encoding (R = class id, G * 256 + B = track id), e.g.
  `<KITTI_STEP_ROOT>/panoptic_maps/val`. Every ground-truth sequence and
  frame must have a prediction of the same size; extra ones are ignored.
  Sequences are scored independently and merged in sorted order, so any
  `num_workers` gives identical results.

  Returns:
    `StqAccumulator.result()`, sequence ids being the folder names.

  Raises:
    FileNotFoundError: a missing folder or prediction PNG.
    ValueError: bad sizes or ids (naming the file), bad num_workers.
  """
  if not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f'num_workers: expected an int >= 1, got {num_workers!r}')
  for name, folder in (('gt_folder', gt_folder), ('pred_folder', pred_folder)):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f'{name}: folder {folder} does not exist')
  sequences = sorted(
      d for d in os.listdir(gt_folder)
      if os.path.isdir(os.path.join(gt_folder, d))
  )
  if not sequences:
    raise ValueError(f'gt_folder: no sequence folders in {gt_folder}')
  settings = (num_classes, tuple(things), ignore_label,
              max_instances_per_category, offset)
  start = time.time()
  jobs = [(gt_folder, pred_folder, s, settings) for s in sequences]
  if min(num_workers, len(jobs)) <= 1:
    parts = [_evaluate_sequence(*job) for job in jobs]
  else:
    # spawn, not fork: the caller may be a multithreaded JAX process.
    context = multiprocessing.get_context('spawn')
    with context.Pool(min(num_workers, len(jobs))) as pool:
      parts = pool.map(_evaluate_sequence_star, jobs)
  total = StqAccumulator(*settings)
  for part in parts:
    total.merge(part)
  results = total.result()
  logging.info(
      'STQ over %d sequences in %.2f s: STQ %.4f AQ %.4f SQ %.4f',
      len(sequences), time.time() - start, results['STQ'], results['AQ'],
      results['SQ'],
  )
  return results


def _row(name: str, stq: float, aq: float, sq: float, frames: int) -> str:
  return (
      f'{name:10s}| {100 * stq:5.1f}  {100 * aq:5.1f}  {100 * sq:5.1f} '
      f'{frames:6d}'
  )


def format_table(results: Mapping[str, Any]) -> str:
  """Formats per-sequence and total STQ / AQ / SQ rows in percent."""
  rule = '-' * 39
  lines = [f'{"":10s}| {"STQ":>5s}  {"AQ":>5s}  {"SQ":>5s} {"frames":>6s}',
           rule]
  rows = zip(
      results['ID_per_seq'], results['STQ_per_seq'], results['AQ_per_seq'],
      results['IoU_per_seq'], results['Length_per_seq'], strict=True,
  )
  lines += [_row(str(seq), *values) for seq, *values in rows]
  lines += [rule, _row('All', results['STQ'], results['AQ'], results['SQ'],
                       sum(results['Length_per_seq']))]
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point; returns the process exit code."""
  parser = argparse.ArgumentParser(
      description='Segmentation and Tracking Quality (deeplab2 STQuality) '
      'of STEP-format PNG folders; defaults are KITTI-STEP.'
  )
  parser.add_argument('--gt_folder', required=True,
                      help='e.g. <KITTI_STEP_ROOT>/panoptic_maps/val')
  parser.add_argument('--pred_folder', required=True)
  parser.add_argument('--output', default=None, help='write results JSON here')
  parser.add_argument('--num_workers', type=int, default=1)
  parser.add_argument('--num_classes', type=int,
                      default=KITTI_STEP_NUM_CLASSES)
  parser.add_argument('--things', default=','.join(
      str(t) for t in KITTI_STEP_THINGS), help='comma-separated class ids')
  parser.add_argument('--ignore_label', type=int,
                      default=KITTI_STEP_IGNORE_LABEL)
  parser.add_argument('--max_instances_per_category', type=int,
                      default=KITTI_STEP_MAX_INSTANCES)
  parser.add_argument('--offset', type=int, default=KITTI_STEP_OFFSET)
  args = parser.parse_args(argv)

  def compute():
    try:
      things = tuple(int(t) for t in args.things.split(',') if t.strip())
    except ValueError as e:
      raise ValueError(
          f'--things={args.things!r}: expected comma-separated ints') from e
    return stq_compute(
        args.gt_folder, args.pred_folder, num_workers=args.num_workers,
        num_classes=args.num_classes, things=things,
        ignore_label=args.ignore_label,
        max_instances_per_category=args.max_instances_per_category,
        offset=args.offset,
    )

  return cli.run_scorer(compute, args.output, format_table)


if __name__ == '__main__':
  # Run the importable copy so Pool workers (spawn) pickle functions by their
  # package path, not by `__main__`.
  from pix2seq_d_jax.evaluation import stq as _stq

  sys.exit(_stq.main())
