"""DAVIS 2017 video object segmentation scores (J&F), as davis2017-evaluation.

Re-implements the official DAVIS 2017 evaluator (davisvideochallenge/
davis2017-evaluation, `evaluation_method.py`) so that numbers are comparable
with published ones: J is the region IoU and F the boundary F-measure
(boundaries from `seg2bmap`, matched within a disk of radius
ceil(0.008 * image diagonal)); each object gets the mean, the recall (fraction
of frames scoring > 0.5) and the decay (first quarter minus last quarter) of
its per-frame scores, and the global numbers average those over all objects
of all sequences. The official code's quirks are kept on purpose, because
they change the numbers:

- The number of ground-truth objects of a sequence is the largest id of its
  FIRST annotation (after void 255 becomes 0); higher ids are background.
- Semi-supervised: the first and last frames are not scored (their result
  PNGs are not read) and void pixels are NOT excluded (they are background).
- Unsupervised: every frame is scored, ground-truth void pixels (255) are
  excluded from J and F, at most 20 proposals are allowed, and proposals are
  matched to objects by the Hungarian method on (mean J + mean F) / 2. The
  per-object rows (`<seq>_<k>`) come in the order scipy returns the matched
  pairs: by proposal id, not by object id.
- Result masks split into ids 1..max id over the frames read; a result id
  above the object count (semi-supervised) is an error.

Differences, none of which changes a number on DAVIS: boundaries are dilated
with an exact Euclidean distance transform (equal to dilation by skimage's
`disk`, without the cv2/skimage dependencies); decay bin indices are exact
where the official uint8 cast would wrap (sequences longer than 255 frames);
bad inputs raise one-line errors instead of exiting.

One concept, kept in one module although it is long: the official
evaluator's metric, statistics, protocols and command line, so that every
quirk above can be read next to the code that reproduces it.

`db_eval_iou`, `db_eval_boundary`, `db_statistics`, `evaluate_sequence` and
`evaluate_sequence_ids` are the in-memory building blocks; `evaluate` scores a
results folder against a DAVIS folder, and `python -m
pix2seq_d_jax.evaluation.davis` is the command line with the official flags.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from pix2seq_d_jax.evaluation import cli
from pix2seq_d_jax.formats import davis as davis_format

TASKS = ("semi-supervised", "unsupervised")
SUBSETS = ("train", "val", "test-dev", "test-challenge")
VOID_LABEL = 255
MAX_PROPOSALS = 20
BOUND_TH = 0.008
GLOBAL_MEASURES = (
  "J&F-Mean",
  "J-Mean",
  "J-Recall",
  "J-Decay",
  "F-Mean",
  "F-Recall",
  "F-Decay",
)
_RESOLUTION = "480p"


# ----------------------------------------------------------------------------
# Per-frame measures.
# ----------------------------------------------------------------------------


def _check_same_shape(gt: np.ndarray, pred: np.ndarray, void, what: str):
  if gt.shape != pred.shape:
    raise ValueError(
      f"{what}: ground truth {gt.shape} and prediction {pred.shape} differ "
      "in shape"
    )
  if void is not None and np.shape(void) != gt.shape:
    raise ValueError(
      f"{what}: void {np.shape(void)} and ground truth {gt.shape} differ in "
      "shape"
    )


def db_eval_iou(
  gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None
) -> np.ndarray:
  """Region similarity J (Jaccard index) per frame.

  Args:
    gt: bool [t, h, w] (or [h, w]) ground-truth mask of one object.
    pred: bool, same shape: the predicted mask.
    void: bool, same shape: pixels left out of both counts, or None.

  Returns:
    float64 [t] (0-d for one frame): |pred & gt| / |pred | gt| over non-void
    pixels; 1 where the union is empty.
  """
  gt = np.asarray(gt).astype(bool)
  pred = np.asarray(pred).astype(bool)
  _check_same_shape(gt, pred, void, "db_eval_iou")
  keep = np.ones_like(gt) if void is None else ~np.asarray(void).astype(bool)
  inters = np.sum(pred & gt & keep, axis=(-2, -1))
  union = np.sum((pred | gt) & keep, axis=(-2, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    j = np.asarray(inters / union, dtype=np.float64)
  j[np.isclose(union, 0)] = 1
  return j


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> int:
  """Radius in pixels within which boundary pixels match.

  Args:
    height: frame height.
    width: frame width.
    bound_th: a fraction of the image diagonal when < 1 (rounded up, as
      `ceil(bound_th * norm([h, w]))`), else the radius itself (an integer).

  Returns:
    The radius, e.g. 8 for 480x854 frames.

  Raises:
    ValueError: negative `bound_th`, or a non-integer one >= 1.
  """
  if bound_th < 0:
    raise ValueError(f"bound_th: expected >= 0, got {bound_th}")
  if bound_th >= 1:
    if bound_th != int(bound_th):
      raise ValueError(
        f"bound_th: values >= 1 are a radius in pixels and must be an "
        f"integer, got {bound_th}"
      )
    return int(bound_th)
  return int(np.ceil(bound_th * np.linalg.norm((height, width))))


def seg2bmap(seg: np.ndarray) -> np.ndarray:
  """One-pixel-wide boundary map of a mask (David Martin's seg2bmap).

  A pixel is on the boundary when it differs from its east, south or
  south-east neighbour, so boundaries sit half a pixel towards the origin.
  In the last row only the east neighbour counts, in the last column only the
  south one, and the bottom-right pixel is never a boundary.

  Args:
    seg: [..., h, w] mask (nonzero = foreground).

  Returns:
    bool [..., h, w] boundary map.
  """
  seg = np.asarray(seg).astype(bool)
  if seg.ndim < 2:
    raise ValueError(f"seg2bmap: expected [..., h, w], got shape {seg.shape}")
  e = np.zeros_like(seg)
  s = np.zeros_like(seg)
  se = np.zeros_like(seg)
  e[..., :, :-1] = seg[..., :, 1:]
  s[..., :-1, :] = seg[..., 1:, :]
  se[..., :-1, :-1] = seg[..., 1:, 1:]
  b = (seg ^ e) | (seg ^ s) | (seg ^ se)
  b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
  b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
  b[..., -1, -1] = False
  return b


def dilate_disk(bmap: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation by a disk: pixels within Euclidean distance `radius`.

  Equals dilation by skimage's `disk(radius)` (offsets with
  dy**2 + dx**2 <= radius**2), as the official evaluator does with cv2, but
  computed with an exact distance transform on the boundary's bounding box,
  which is much faster for sparse boundaries.

  Args:
    bmap: bool [h, w].
    radius: integer radius >= 0.

  Returns:
    bool [h, w].
  """
  bmap = np.asarray(bmap, dtype=bool)
  out = np.zeros_like(bmap)
  ys, xs = np.nonzero(bmap)
  if ys.size == 0:
    return out
  h, w = bmap.shape
  y0, y1 = max(ys.min() - radius, 0), min(ys.max() + radius + 1, h)
  x0, x1 = max(xs.min() - radius, 0), min(xs.max() + radius + 1, w)
  crop = bmap[y0:y1, x0:x1]
  # scipy is imported on first use: every training process loads this
  # module through the evaluator registry, and scipy costs it 0.6 s.
  from scipy import ndimage

  # distance_transform_edt is exact (sqrt of an integer), and sqrt is
  # monotone and correctly rounded, so `<= radius` is `d2 <= radius**2`.
  out[y0:y1, x0:x1] = ndimage.distance_transform_edt(~crop) <= radius
  return out


class _FrameBoundaries:
  """Boundary pixels and their dilation for masks of one frame, memoised."""

  def __init__(self, masks: np.ndarray, keep: np.ndarray | None, radius: int):
    self._masks = masks
    self._keep = keep
    self._radius = radius
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (flat indices of boundary pixels, flat bool dilation)."""
    if k not in self._cache:
      mask = self._masks[k]
      if self._keep is not None:
        mask = mask & self._keep
      bmap = seg2bmap(mask)
      self._cache[k] = (
        np.flatnonzero(bmap),
        dilate_disk(bmap, self._radius).ravel(),
      )
    return self._cache[k]


def _f_measure(fg_match: int, n_fg: int, gt_match: int, n_gt: int) -> float:
  # The official special cases and arithmetic order, for identical floats.
  if n_fg == 0 and n_gt > 0:
    precision, recall = 1, 0
  elif n_fg > 0 and n_gt == 0:
    precision, recall = 0, 1
  elif n_fg == 0 and n_gt == 0:
    precision, recall = 1, 1
  else:
    precision = fg_match / float(n_fg)
    recall = gt_match / float(n_gt)
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


def _frame_scores(
  gt: np.ndarray,
  pred: np.ndarray,
  void: np.ndarray | None,
  pairs: Sequence[tuple[int, int]],
  bound_th: float,
) -> tuple[np.ndarray, np.ndarray]:
  """J and F of (pred index, gt index) pairs in one frame.

  Args:
    gt: bool [n, h, w] object masks.
    pred: bool [m, h, w] predicted masks.
    void: bool [h, w] pixels to leave out, or None.
    pairs: (pred index, gt index) pairs to score.
    bound_th: see `boundary_radius`.

  Returns:
    float64 [len(pairs)] J and F.
  """
  h, w = gt.shape[-2:]
  radius = boundary_radius(h, w, bound_th)
  keep = None if void is None else ~void
  gt_b = _FrameBoundaries(gt, keep, radius)
  pred_b = _FrameBoundaries(pred, keep, radius)
  inters = np.zeros(len(pairs), np.int64)
  union = np.zeros(len(pairs), np.int64)
  f = np.zeros(len(pairs), np.float64)
  for p, (jj, ii) in enumerate(pairs):
    both, either = pred[jj] & gt[ii], pred[jj] | gt[ii]
    if keep is not None:
      both, either = both & keep, either & keep
    inters[p] = np.count_nonzero(both)
    union[p] = np.count_nonzero(either)
    fg_idx, fg_dil = pred_b[jj]
    gt_idx, gt_dil = gt_b[ii]
    f[p] = _f_measure(
      int(np.count_nonzero(gt_dil[fg_idx])),
      fg_idx.size,
      int(np.count_nonzero(fg_dil[gt_idx])),
      gt_idx.size,
    )
  with np.errstate(invalid="ignore", divide="ignore"):
    j = inters / union
  j[np.isclose(union, 0)] = 1
  return j, f


def db_eval_boundary(
  gt: np.ndarray,
  pred: np.ndarray,
  void: np.ndarray | None = None,
  bound_th: float = BOUND_TH,
) -> np.ndarray:
  """Boundary F-measure per frame.

  Both masks are multiplied by the non-void pixels, reduced to `seg2bmap`
  boundaries, and a boundary pixel matches when the other boundary lies
  within `boundary_radius` of it. Precision and recall follow the official
  special cases: no predicted boundary gives P = 1, R = 0 (P = R = 1 when
  the ground truth has none either); no ground-truth boundary gives P = 0,
  R = 1. F = 2PR / (P + R), 0 when P + R = 0.

  Args:
    gt: bool [t, h, w] (or [h, w]) ground-truth mask of one object.
    pred: bool, same shape: the predicted mask.
    void: bool, same shape, or None.
    bound_th: see `boundary_radius`.

  Returns:
    float64 [t] (0-d for one frame).
  """
  gt = np.asarray(gt).astype(bool)
  pred = np.asarray(pred).astype(bool)
  _check_same_shape(gt, pred, void, "db_eval_boundary")
  if gt.ndim not in (2, 3):
    raise ValueError(
      f"db_eval_boundary: expected [t, h, w] or [h, w], got {gt.shape}"
    )
  single = gt.ndim == 2
  if single:
    gt, pred = gt[None], pred[None]
    void = None if void is None else np.asarray(void)[None]
  void = None if void is None else np.asarray(void).astype(bool)
  out = np.zeros(gt.shape[0], np.float64)
  for t in range(gt.shape[0]):
    _, f = _frame_scores(
      gt[t][None],
      pred[t][None],
      None if void is None else void[t],
      [(0, 0)],
      bound_th,
    )
    out[t] = f[0]
  return out[0] if single else out


def db_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
  """Mean, recall and decay of one object's per-frame scores.

  Recall is the fraction of frames scoring strictly above 0.5. Decay splits
  the frames into 4 overlapping bins at round(linspace(1, t, 5) + 1e-10) - 1
  (bin i = frames ids[i]..ids[i+1], inclusive) and is mean(first bin) -
  mean(last bin). NaNs are ignored in every mean.

  Args:
    per_frame: float [t] scores.

  Returns:
    (mean, recall, decay) as floats (NaN for an empty input).
  """
  x = np.asarray(per_frame)
  if x.ndim != 1:
    raise ValueError(f"db_statistics: expected a [t] array, got {x.shape}")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=RuntimeWarning)
    mean = np.nanmean(x)
    recall = np.nanmean(x > 0.5)
    ids = (np.round(np.linspace(1, len(x), 4 + 1) + 1e-10) - 1).astype(np.int64)
    bins = [x[ids[i] : ids[i + 1] + 1] for i in range(4)]
    decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
  return float(mean), float(recall), float(decay)


# ----------------------------------------------------------------------------
# Per-sequence evaluation.
# ----------------------------------------------------------------------------


_FrameFn = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")


def _check_num_results(task: str, num_results: int, num_objects: int) -> None:
  if task == "semi-supervised" and num_results > num_objects:
    raise ValueError(
      f"the results hold id {num_results} but the sequence has "
      f"{num_objects} objects (ids above the first annotation's largest id)"
    )
  if task == "unsupervised" and num_results > MAX_PROPOSALS:
    raise ValueError(
      f"the results hold id {num_results}; at most {MAX_PROPOSALS} proposals "
      "are allowed"
    )


def _score_frames(
  frame_fn: _FrameFn,
  num_frames: int,
  num_objects: int,
  num_results: int,
  task: str,
  bound_th: float,
) -> tuple[np.ndarray, np.ndarray]:
  """Scores a sequence given frame by frame (see `evaluate_sequence`)."""
  _check_task(task)
  _check_num_results(task, num_results, num_objects)
  n = num_objects
  # Too few results are padded with empty masks, as the official code does.
  m = max(num_results, n)
  if task == "semi-supervised":
    pairs = [(i, i) for i in range(n)]
  else:
    pairs = [(jj, ii) for jj in range(m) for ii in range(n)]
  j_all = np.zeros((len(pairs), num_frames))
  f_all = np.zeros((len(pairs), num_frames))
  for t in range(num_frames):
    gt, pred, void = frame_fn(t)
    if pred.shape[0] < m:
      pad = np.zeros((m - pred.shape[0], *pred.shape[1:]), bool)
      pred = np.concatenate([pred, pad], axis=0)
    j_all[:, t], f_all[:, t] = _frame_scores(gt, pred, void, pairs, bound_th)
  if task == "semi-supervised" or n == 0:
    return j_all, f_all
  # [m, n, t] C-ordered as the official arrays, so the means are bitwise equal.
  j_all = j_all.reshape(m, n, num_frames)
  f_all = f_all.reshape(m, n, num_frames)
  score = (np.mean(j_all, axis=2) + np.mean(f_all, axis=2)) / 2
  from scipy import optimize  # On first use, as ndimage above.

  rows, cols = optimize.linear_sum_assignment(-score)
  return j_all[rows, cols, :], f_all[rows, cols, :]


def evaluate_sequence(
  gt_masks: np.ndarray,
  void: np.ndarray | None,
  result_masks: np.ndarray,
  task: str,
  bound_th: float = BOUND_TH,
) -> tuple[np.ndarray, np.ndarray]:
  """Per-object, per-frame J and F of one sequence on the frames given.

  The frames are taken as given: for the official semi-supervised protocol
  pass frames 1..t-2 (or use `evaluate_sequence_ids`, which does it).

  Args:
    gt_masks: bool [n, t, h, w] ground-truth object masks (object k = id k+1).
    void: bool [t, h, w] void pixels, or None. Used by the unsupervised task
      only: the official semi-supervised path passes no void mask, so there
      void pixels count as background.
    result_masks: bool [m, t, h, w] result masks (result k = id k+1); fewer
      than n are padded with empty masks.
    task: 'semi-supervised' (result k scored against object k; m > n is an
      error) or 'unsupervised' (m <= 20; Hungarian matching on
      (mean J + mean F) / 2).
    bound_th: see `boundary_radius`.

  Returns:
    (J, F), float64 [n, t] each. Rows follow object order for
    semi-supervised, and the matched pairs by proposal order (scipy's
    `linear_sum_assignment` rows) for unsupervised, as the official code.

  Raises:
    ValueError: bad shapes, an unknown task, or too many results.
  """
  gt_masks = np.asarray(gt_masks).astype(bool)
  result_masks = np.asarray(result_masks).astype(bool)
  if gt_masks.ndim != 4 or result_masks.ndim != 4:
    raise ValueError(
      f"evaluate_sequence: expected gt_masks [n, t, h, w] and result_masks "
      f"[m, t, h, w], got {gt_masks.shape} and {result_masks.shape}"
    )
  if gt_masks.shape[1:] != result_masks.shape[1:]:
    raise ValueError(
      f"evaluate_sequence: gt_masks {gt_masks.shape} and result_masks "
      f"{result_masks.shape} differ in [t, h, w]"
    )
  if void is not None:
    void = np.asarray(void).astype(bool)
    if void.shape != gt_masks.shape[1:]:
      raise ValueError(
        f"evaluate_sequence: void {void.shape} is not [t, h, w] = "
        f"{gt_masks.shape[1:]}"
      )
  use_void = void if task == "unsupervised" else None

  def frame_fn(t):
    return (
      gt_masks[:, t],
      result_masks[:, t],
      None if use_void is None else use_void[t],
    )

  return _score_frames(
    frame_fn,
    gt_masks.shape[1],
    gt_masks.shape[0],
    result_masks.shape[0],
    task,
    bound_th,
  )


def evaluated_frames(num_frames: int, task: str) -> range:
  """Indices of the frames the official protocol scores (and reads)."""
  _check_task(task)
  return (
    range(1, num_frames - 1) if task == "semi-supervised" else range(num_frames)
  )


def evaluate_sequence_ids(
  gt_ids: np.ndarray,
  result_ids: np.ndarray,
  task: str,
  bound_th: float = BOUND_TH,
) -> tuple[np.ndarray, np.ndarray]:
  """Scores one whole sequence from id maps, with the official protocol.

  Void (255) becomes background; the object count is the largest id of the
  first annotation; semi-supervised scores frames 1..t-2 only, unsupervised
  every frame with void excluded; results split into ids 1..(largest id over
  the scored frames).

  Args:
    gt_ids: integer [t, h, w] annotations of all frames (255 = void).
    result_ids: integer [t, h, w] result ids of all frames; for
      semi-supervised, frames 0 and t-1 are ignored (may be anything).
    task: 'semi-supervised' or 'unsupervised'.
    bound_th: see `boundary_radius`.

  Returns:
    (J, F), float64 [n, len(evaluated_frames(t, task))] each; rows as in
    `evaluate_sequence`.

  Raises:
    ValueError: bad shapes, too few frames, an unknown task, or too many
      result ids.
  """
  gt_ids = np.asarray(gt_ids)
  result_ids = np.asarray(result_ids)
  if gt_ids.ndim != 3 or gt_ids.shape != result_ids.shape:
    raise ValueError(
      f"evaluate_sequence_ids: expected gt_ids and result_ids [t, h, w] of "
      f"one shape, got {gt_ids.shape} and {result_ids.shape}"
    )
  frames = evaluated_frames(gt_ids.shape[0], task)
  if len(frames) == 0:
    raise ValueError(
      f"evaluate_sequence_ids: {gt_ids.shape[0]} frames leave none to score "
      f"for the {task} task"
    )
  void = gt_ids == VOID_LABEL
  gt = np.where(void, 0, gt_ids)
  num_objects = int(gt[0].max())
  num_results = int(result_ids[frames.start : frames.stop].max())
  gt_labels = np.arange(1, num_objects + 1)[:, None, None]
  result_labels = np.arange(1, num_results + 1)[:, None, None]
  use_void = task == "unsupervised"

  def frame_fn(t):
    frame = frames[t]
    return (
      gt[frame] == gt_labels,
      result_ids[frame] == result_labels,
      void[frame] if use_void else None,
    )

  return _score_frames(
    frame_fn, len(frames), num_objects, num_results, task, bound_th
  )


# ----------------------------------------------------------------------------
# Folder evaluation.
# ----------------------------------------------------------------------------


def _frame_id(path: str) -> str:
  # The official id: the file name without its extension(s), dots removed.
  return "".join(os.path.basename(path).split(".")[:-1])


def _sorted_files(folder: str, ext: str) -> list[str]:
  if not os.path.isdir(folder):
    return []
  return sorted(
    os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(ext)
  )


def _list_sequences(
  davis_path: str, task: str, subset: str
) -> list[tuple[str, list[str]]]:
  """Checks the DAVIS layout; returns [(sequence, its annotation PNGs)]."""
  if not os.path.isdir(davis_path):
    raise FileNotFoundError(f"davis_path: folder {davis_path} does not exist")
  annotations = (
    "Annotations" if task == "semi-supervised" else "Annotations_unsupervised"
  )
  mask_root = os.path.join(davis_path, annotations, _RESOLUTION)
  image_root = os.path.join(davis_path, "JPEGImages", _RESOLUTION)
  year = (
    "2019" if task == "unsupervised" and subset.startswith("test") else "2017"
  )
  list_file = os.path.join(davis_path, "ImageSets", year, f"{subset}.txt")
  if not os.path.isfile(list_file):
    raise FileNotFoundError(
      f"davis_path: sequence list {list_file} for set {subset!r} not found"
    )
  if not os.path.isdir(mask_root):
    raise FileNotFoundError(
      f"davis_path: annotation folder {mask_root} for the {task} task not found"
    )
  with open(list_file) as f:
    # Repeated names count once: the official reader keys a dict by name.
    names = list(dict.fromkeys(line.strip() for line in f if line.strip()))
  sequences = []
  for seq in names:
    images = _sorted_files(os.path.join(image_root, seq), ".jpg")
    if not images:
      raise FileNotFoundError(
        f"{os.path.join(image_root, seq)}: no .jpg images for sequence {seq}"
      )
    masks = _sorted_files(os.path.join(mask_root, seq), ".png")
    if len(masks) < len(images):
      raise FileNotFoundError(
        f"{os.path.join(mask_root, seq)}: {len(masks)} annotation PNGs for "
        f"{len(images)} images of sequence {seq}"
      )
    sequences.append((seq, masks))
  return sequences


def _read_frames(paths: Sequence[str], shape=None) -> np.ndarray:
  frames = []
  for path in paths:
    ids = davis_format.read_palette_png(path)
    if shape is None:
      shape = ids.shape
    if ids.shape != shape:
      raise ValueError(
        f"{path}: {ids.shape[0]}x{ids.shape[1]} pixels, expected "
        f"{shape[0]}x{shape[1]} (h x w) as the sequence's annotations"
      )
    frames.append(ids)
  return np.stack(frames)


def _evaluate_files(
  args: tuple[str, list[str], str, str, float],
) -> tuple[np.ndarray, np.ndarray]:
  """Reads and scores one sequence (a process-pool job)."""
  seq, mask_files, results_path, task, bound_th = args
  gt_ids = _read_frames(mask_files)
  frames = evaluated_frames(len(mask_files), task)
  if len(frames) == 0:
    raise ValueError(
      f"sequence {seq}: {len(mask_files)} annotated frames leave none to "
      f"score for the {task} task"
    )
  result_files = [
    os.path.join(results_path, seq, f"{_frame_id(mask_files[t])}.png")
    for t in frames
  ]
  read = _read_frames(result_files, gt_ids.shape[1:])
  result_ids = np.zeros(gt_ids.shape, read.dtype)
  result_ids[frames.start : frames.stop] = read
  num_objects = int(np.where(gt_ids[0] == VOID_LABEL, 0, gt_ids[0]).max())
  maxima = read.reshape(len(read), -1).max(axis=1)
  try:
    _check_num_results(task, int(maxima.max()), num_objects)
  except ValueError as e:
    raise ValueError(f"{result_files[int(np.argmax(maxima))]}: {e}") from None
  return evaluate_sequence_ids(gt_ids, result_ids, task, bound_th)


def evaluate(
  davis_path: str,
  results_path: str,
  task: str,
  subset: str = "val",
  num_workers: int = 1,
  *,
  bound_th: float = BOUND_TH,
) -> dict[str, Any]:
  """Scores a results folder as davis2017-evaluation's evaluation_method.py.

  Args:
    davis_path: DAVIS root with `ImageSets/2017/<subset>.txt`,
      `JPEGImages/480p/<seq>/*.jpg` and `Annotations/480p/<seq>/*.png`
      (semi-supervised) or `Annotations_unsupervised/480p/<seq>/*.png`.
    results_path: folder with `<seq>/<frame>.png` palette PNGs of ids, one
      per annotated frame that the task scores.
    task: 'semi-supervised' or 'unsupervised'.
    subset: 'train', 'val', 'test-dev' or 'test-challenge' (the list file;
      test sets of the unsupervised task are listed under ImageSets/2019).
    num_workers: processes; > 1 scores sequences in a spawn-context pool.
      Results are identical for any value.
    bound_th: see `boundary_radius`.

  Returns:
    {'J&F-Mean', 'J-Mean', 'J-Recall', 'J-Decay', 'F-Mean', 'F-Recall',
    'F-Decay': fractions (means over all objects of all sequences),
    'per_sequence': {'<seq>_<k>': {'J-Mean', 'F-Mean'}}}.

  Raises:
    FileNotFoundError: a missing folder, list file, image folder or PNG.
    ValueError: a bad argument, an undecodable or misshapen PNG, too many
      result ids, or no object to score.
  """
  _check_task(task)
  if subset not in SUBSETS:
    raise ValueError(
      f"subset: expected one of {', '.join(SUBSETS)}, got {subset!r}"
    )
  if not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
  boundary_radius(1, 1, bound_th)  # Validates bound_th before any work.
  start = time.time()
  sequences = _list_sequences(davis_path, task, subset)
  if not os.path.isdir(results_path):
    raise FileNotFoundError(
      f"results_path: folder {results_path} does not exist"
    )
  jobs = [
    (seq, masks, results_path, task, bound_th) for seq, masks in sequences
  ]
  num_procs = min(num_workers, len(jobs))
  if num_procs <= 1:
    scores = [_evaluate_files(job) for job in jobs]
  else:
    # spawn, not fork: the caller may be a multithreaded JAX process.
    with multiprocessing.get_context("spawn").Pool(num_procs) as pool:
      scores = pool.map(_evaluate_files, jobs, chunksize=1)

  stats = {name: [] for name in ("JM", "JR", "JD", "FM", "FR", "FD")}
  per_sequence = {}
  for (seq, _), (j, f) in zip(sequences, scores, strict=True):
    for k in range(j.shape[0]):
      jm, jr, jd = db_statistics(j[k])
      fm, fr, fd = db_statistics(f[k])
      for name, value in zip(stats, (jm, jr, jd, fm, fr, fd), strict=True):
        stats[name].append(value)
      per_sequence[f"{seq}_{k + 1}"] = {"J-Mean": jm, "F-Mean": fm}
  if not per_sequence:
    raise ValueError(
      f"davis_path: no object to score in the {subset!r} sequences "
      f"({len(sequences)} listed)"
    )
  means = {name: float(np.mean(values)) for name, values in stats.items()}
  results = {
    "J&F-Mean": float((np.mean(stats["JM"]) + np.mean(stats["FM"])) / 2.0),
    "J-Mean": means["JM"],
    "J-Recall": means["JR"],
    "J-Decay": means["JD"],
    "F-Mean": means["FM"],
    "F-Recall": means["FR"],
    "F-Decay": means["FD"],
    "per_sequence": per_sequence,
  }
  logging.info(
    "DAVIS %s %s: %d sequences, %d objects in %.2f s: J&F %.4f",
    task,
    subset,
    len(sequences),
    len(per_sequence),
    time.time() - start,
    results["J&F-Mean"],
  )
  return results


def format_tables(results: Mapping[str, Any], subset: str = "val") -> str:
  """The global and per-sequence tables, like evaluation_method.py prints."""
  rule = "-" * 27
  lines = [f"{rule} Global results for {subset} {rule}"]
  lines.append("  ".join(f"{m:>8s}" for m in GLOBAL_MEASURES))
  lines.append("  ".join(f"{results[m]:8.3f}" for m in GLOBAL_MEASURES))
  lines.append("")
  lines.append(f"{rule[:22]} Per sequence results for {subset} {rule[:22]}")
  rows = results["per_sequence"]
  width = max([len("Sequence"), *(len(name) for name in rows)])
  lines.append(f"{'Sequence':<{width}s}  {'J-Mean':>6s}  {'F-Mean':>6s}")
  for name, row in rows.items():
    lines.append(
      f"{name:<{width}s}  {row['J-Mean']:6.3f}  {row['F-Mean']:6.3f}"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point; returns the process exit code."""
  parser = argparse.ArgumentParser(
    description="DAVIS 2017 J&F (davis2017-evaluation semantics)."
  )
  parser.add_argument("--davis_path", required=True)
  parser.add_argument("--results_path", required=True)
  parser.add_argument("--task", choices=TASKS, default="semi-supervised")
  parser.add_argument("--set", choices=SUBSETS, default="val", dest="subset")
  parser.add_argument("--output", default=None, help="write results JSON here")
  parser.add_argument("--num_workers", type=int, default=1)
  args = parser.parse_args(argv)
  return cli.run_scorer(
    lambda: evaluate(
      args.davis_path,
      args.results_path,
      args.task,
      args.subset,
      num_workers=args.num_workers,
    ),
    args.output,
    lambda results: format_tables(results, args.subset),
  )


if __name__ == "__main__":
  # Run the importable copy of this module so Pool workers (spawn) pickle
  # functions by their package path, not by `__main__`.
  from pix2seq_d_jax.evaluation import davis as _davis

  sys.exit(_davis.main())
