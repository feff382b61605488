"""STQ (AQ, SQ) of whole sequences segmented frame by frame, KITTI-STEP style.

For every eval sequence: preprocess each frame as for images, pad the
sequence to a multiple of `length_bucket` frames (repeating the last frame,
so one compiled program serves every length in a bucket), run the video
predict function (the first frame from noise, later frames conditioned on
the model's own previous masks, so instance ids carry over as track ids),
crop the padding and resize to the original frame size (nearest). Classes
map to STEP train ids (class c -> c - 1, void 0 -> 255) and the instance id
is the track id on thing classes, 0 on stuff; no vote or minimum size is
applied (STQ scores pixels, not segments). Ground truth is the source's
(`read_sequence`): thing pixels without a track id are crowd, as in STEP.
Scoring is `evaluation.stq`'s deeplab2-exact accumulator with the
dataset's classes (for KITTI-STEP: 19 train ids, person and car tracked,
void 255), one sequence at a time. Global batches hold consecutive
sequences, each process taking its block of rows and writing its sequences'
STEP PNGs (`<workdir>/predictions/<name>_step<N>/<seq>/<frame>.png`, what
`python -m pix2seq_d_jax.evaluation.stq --pred_folder` reads); the
per-sequence counts are gathered to every process in sequence order, so the
metrics equal a single-process run's exactly. Process 0 writes them, with
the per-sequence values, to `metrics.json` in the same folder.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from pix2seq_d_jax import sharding
from pix2seq_d_jax.data import kitti_step as kitti_step_data
from pix2seq_d_jax.evaluation import stq
from pix2seq_d_jax.evaluators import base, postprocess, register
from pix2seq_d_jax.formats import atomic
from pix2seq_d_jax.formats import kitti_step as step_format

# Classes (0 = void, c = train id + 1) as STEP train ids (void 255).
to_train_ids = kitti_step_data.class_to_train_id


def make_accumulator(is_thing: np.ndarray) -> stq.StqAccumulator:
  """An STQ accumulator for a dataset's classes (`metadata.is_thing`).

  Args:
    is_thing: bool [num_classes], entry 0 void.

  Returns:
    STEP settings over train ids 0..num_classes-2, the thing classes
    tracked, void 255: for KITTI-STEP the classes of
    `stq.kitti_step_accumulator()`. The panoptic divisor is the STEP PNG's
    track range (65536) rather than KITTI's 1000, so any track id a
    sequence numbers fits; STQ does not depend on it.
  """
  is_thing = np.asarray(is_thing, bool)
  return stq.StqAccumulator(
      num_classes=len(is_thing) - 1,
      things=tuple(int(c) - 1 for c in np.flatnonzero(is_thing) if c > 0),
      ignore_label=kitti_step_data.VOID_TRAIN_ID,
      max_instances_per_category=step_format.MAX_TRACK_ID + 1,
      offset=stq.KITTI_STEP_OFFSET,
  )


def sequence_step_ids(
    semantic: np.ndarray,
    instance: np.ndarray,
    *,
    valid_size: tuple[int, int] | np.ndarray,
    orig_size: tuple[int, int] | np.ndarray,
    image_size: int,
    is_thing: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """STEP (train ids, track ids) of one sequence's mask-size predictions.

  Args:
    semantic, instance: int [T, m, m] predictions of the real frames.
    valid_size: (h, w) of the resized frame inside the padded image.
    orig_size: (H, W) of the frames.
    image_size: S, the padded input size.
    is_thing: bool [num_classes].

  Returns:
    (train_ids, track_ids), int32 [T, H, W] each: void 255; the track id is
    the predicted instance on thing classes and 0 elsewhere.
  """
  valid = postprocess.valid_mask_size(
      valid_size, image_size, semantic.shape[-1])
  size = tuple(int(v) for v in orig_size)
  # Semantic and instance stacked on a channel axis: one resize per frame.
  both = np.stack([
      postprocess.crop_and_resize_to_original(np.stack(pair, -1), valid, size)
      for pair in zip(semantic, instance, strict=True)
  ]).astype(np.int64)
  is_thing = np.asarray(is_thing, bool)
  sem = np.clip(both[..., 0], 0, len(is_thing) - 1)
  track = np.where(is_thing[sem], both[..., 1], 0)
  return to_train_ids(sem), track.astype(np.int32)


@register("kitti_step_stq")
class KittiStepStqEvaluator(base.Evaluator):
  """STQ, AQ and SQ over a video split (KITTI-STEP or synthetic video)."""

  def __init__(self, *, name: str, source: Any, **kwargs: Any):
    """See `base.Evaluator`; `source` must be a video source."""
    for attr in ("sequence_names", "read_sequence", "frame_names",
                 "num_frames"):
      if not hasattr(source, attr):
        raise ValueError(
            f"config.evals.{name}.type='kitti_step_stq' needs a video source "
            f"(config.input.source such as 'kitti_step' or "
            f"'synthetic_video'); {type(source).__name__} has no {attr}")
    super().__init__(name=name, source=source, **kwargs)
    self.things = np.asarray(source.metadata.is_thing, bool)
    names = list(source.sequence_names)
    if self.config.get("max_sequences"):
      names = names[:self.config.max_sequences]
    self.names = names
    self.max_frames = self.config.get("max_frames")

  def _global_batches(self) -> list[list[int]]:
    """Sequence indices of every global batch (-1 = padding)."""
    b = self.config.batch_size
    count = math.ceil(len(self.names) / b)
    idx = list(range(len(self.names))) + [-1] * (count * b - len(self.names))
    return [idx[i * b:(i + 1) * b] for i in range(count)]

  def _num_frames(self, index: int) -> int:
    n = self.source.num_frames(self.names[index])
    return min(n, self.max_frames) if self.max_frames else n

  def _frames(self, index: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Preprocessed frames [T, S, S, 3], GT train and track ids [T, H, W]."""
    seq = self.source.read_sequence(self.names[index])
    t_max = self._num_frames(index)
    frames = [
        self.preprocess_fn({k: seq[k][t] for k in (
            "image", "semantic", "instance", "crowd")} | {"image_id": 0})
        for t in range(t_max)
    ]
    # Instance is 0 on stuff, void and crowd; STQ reads a thing pixel with
    # track 0 as crowd, STEP's encoding.
    gt_sem = to_train_ids(seq["semantic"][:t_max])
    gt_track = np.where(self.things[seq["semantic"][:t_max]],
                        seq["instance"][:t_max], 0)
    return {
        "image": np.stack([f["image"] for f in frames]),
        "valid_size": frames[0]["valid_size"],
    }, gt_sem, gt_track

  def run(self, params: Any, batch_stats: Any, *, step: int) -> dict:
    """Segments every eval sequence and returns the STQ metrics."""
    out_dir = (epath.Path(self.workdir) / "predictions"
               / f"{self.name}_step{step}")
    bucket = int(self.config.get("length_bucket", 16))
    write = bool(self.config.get("write_predictions", True))
    rng = jax.random.key(self.seed)
    nproc, pid = jax.process_count(), jax.process_index()
    local_b = self.config.batch_size // nproc
    records = []
    for i, batch in enumerate(self._global_batches()):
      mine = batch[pid * local_b:(pid + 1) * local_b]
      length = bucket * math.ceil(
          max(self._num_frames(j) for j in batch if j >= 0) / bucket)
      loaded = [self._frames(j if j >= 0 else batch[0]) for j in mine]
      images = np.stack([
          np.concatenate([f["image"], np.repeat(
              f["image"][-1:], length - len(f["image"]), axis=0)])
          for f, _, _ in loaded])
      arrays = sharding.global_batch(
          {"image": images}, self.mesh, self.rules)
      semantic, instance = self.predict_fn(
          params, batch_stats, arrays["image"], jax.random.fold_in(rng, i))
      semantic, instance = base.local_rows(semantic), base.local_rows(instance)
      for row, (j, (frames, gt_sem, gt_track)) in enumerate(
          zip(mine, loaded, strict=True)):
        if j < 0:
          continue
        t = gt_sem.shape[0]
        pred_sem, pred_track = sequence_step_ids(
            semantic[row, :t], instance[row, :t],
            valid_size=frames["valid_size"], orig_size=gt_sem.shape[1:],
            image_size=frames["image"].shape[1], is_thing=self.things)
        name = self.names[j]
        if write:
          self._write(out_dir, name, pred_sem, pred_track)
        records.append({"index": j, "name": name, "state": self.score(
            name, gt_sem, gt_track, pred_sem, pred_track)})
    # Every process's sequences, in sequence order: one accumulator then
    # holds what a single process would have accumulated.
    records = base.gather_records(records)
    acc = make_accumulator(self.things)
    for r in records:
      acc.add_sequence_state(r["name"], r["state"])
    result = acc.result()
    metrics = {
        "stq": result["STQ"], "aq": result["AQ"], "sq": result["SQ"],
        "num_sequences": len(records),
        "num_frames": int(sum(result["Length_per_seq"])),
    }
    if jax.process_index() == 0:
      per_sequence = {
          str(name): {"stq": s, "aq": a, "sq": q, "frames": n}
          for name, s, a, q, n in zip(
              result["ID_per_seq"], result["STQ_per_seq"],
              result["AQ_per_seq"], result["IoU_per_seq"],
              result["Length_per_seq"], strict=True)}
      atomic.write_json(out_dir / "metrics.json",
                        dict(metrics, per_sequence=per_sequence), indent=2)
    # The reporter logs one formatted line per evaluation; this is detail.
    logging.debug("eval/%s at step %d: %s", self.name, step, metrics)
    return metrics

  def score(self, name: str, gt_sem: np.ndarray, gt_track: np.ndarray,
            pred_sem: np.ndarray, pred_track: np.ndarray) -> dict[str, Any]:
    """One sequence's STQ counts (`StqAccumulator.sequence_state`).

    Args:
      name: the sequence.
      gt_sem, pred_sem: int [T, H, W] train ids (void 255).
      gt_track, pred_track: int [T, H, W] track ids.

    Returns:
      The JSON-serialisable counts the evaluator gathers.
    """
    acc = make_accumulator(self.things)
    for frame in zip(gt_sem, gt_track, pred_sem, pred_track, strict=True):
      acc.update(*frame, sequence_id=name)
    return acc.sequence_state(name)

  def _write(self, out_dir: epath.Path, name: str, train_ids: np.ndarray,
             track_ids: np.ndarray) -> None:
    frame_names = self.source.frame_names(name)[:len(train_ids)]
    for frame_name, sem, track in zip(frame_names, train_ids, track_ids,
                                      strict=True):
      step_format.write_step_png(
          out_dir / name / f"{frame_name}.png", sem, track)
