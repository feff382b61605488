"""STQ (AQ, SQ) of whole sequences segmented frame by frame, KITTI-STEP style.

The loop is `video_base.VideoSequenceEvaluator`'s: frames preprocessed as
images, sequences padded to a multiple of `length_bucket` frames, the video
predict function (the first frame from noise, later frames conditioned on
the model's own previous masks, so instance ids carry over as track ids),
the padding cropped and the masks resized to the original frame size
(nearest), per-sequence records gathered over processes in sequence order
so the metrics equal a single-process run's. Here classes map to STEP train
ids (class c -> c - 1, void 0 -> 255) and the instance id is the track id on
thing classes, 0 on stuff; no vote or minimum size is applied (STQ scores
pixels, not segments). Ground truth is the source's (`read_sequence`):
thing pixels without a track id are crowd, as in STEP. Scoring is
`evaluation.stq`'s deeplab2-exact accumulator with the dataset's classes
(for KITTI-STEP: 19 train ids, person and car tracked, void 255), one
sequence at a time, the gathered counts then summed in one accumulator.
Predictions are STEP PNGs (`<workdir>/predictions/<name>_step<N>/<seq>/
<frame>.png`, what `python -m pix2seq_d_jax.evaluation.stq --pred_folder`
reads); process 0 writes the metrics, with the per-sequence values, to
`metrics.json` in the same folder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from pix2seq_d_jax.data import kitti_step as kitti_step_data
from pix2seq_d_jax.evaluation import stq
from pix2seq_d_jax.evaluators import postprocess, register, video_base
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
    image_size: int | tuple[int, int],
    is_thing: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """STEP (train ids, track ids) of one sequence's mask-size predictions.

  Args:
    semantic, instance, valid_size, orig_size, image_size: as in
      `postprocess.sequence_to_original` (int [T, h', w'] predictions).
    is_thing: bool [num_classes].

  Returns:
    (train_ids, track_ids), int32 [T, H, W] each: void 255; the track id is
    the predicted instance on thing classes and 0 elsewhere.
  """
  semantic, instance = postprocess.sequence_to_original(
      semantic, instance, valid_size=valid_size, orig_size=orig_size,
      image_size=image_size)
  return _step_ids(semantic, instance, np.asarray(is_thing, bool))


def _step_ids(semantic: np.ndarray, instance: np.ndarray,
              is_thing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(train ids, track ids) of original-size classes and instance ids."""
  sem = np.clip(semantic.astype(np.int64), 0, len(is_thing) - 1)
  track = np.where(is_thing[sem], instance.astype(np.int64), 0)
  return to_train_ids(sem), track.astype(np.int32)


@register("kitti_step_stq")
class KittiStepStqEvaluator(video_base.VideoSequenceEvaluator):
  """STQ, AQ and SQ over a video split (KITTI-STEP or synthetic video)."""

  TYPE = "kitti_step_stq"
  EXAMPLE_SOURCES = "'kitti_step' or 'synthetic_video'"

  def ground_truth(
      self, semantic: np.ndarray, instance: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, track ids) [T, H, W] of the source's frames."""
    # Instance is 0 on stuff, void and crowd; STQ reads a thing pixel with
    # track 0 as crowd, STEP's encoding.
    return to_train_ids(semantic), np.where(self.things[semantic], instance, 0)

  def to_predictions(
      self, semantic: np.ndarray, instance: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, track ids), int32 [T, H, W] each (`sequence_step_ids`)."""
    return _step_ids(semantic, instance, self.things)

  def score_sequence(
      self, name: str, gt: tuple[np.ndarray, np.ndarray],
      pred: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """{'state': the sequence's STQ counts (`score`)}."""
    return {"state": self.score(name, *gt, *pred)}

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

  def summarize(
      self, records: list[dict[str, Any]]
  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """STQ, AQ, SQ of one accumulator over every sequence; per sequence."""
    acc = make_accumulator(self.things)
    for r in records:
      acc.add_sequence_state(r["name"], r["state"])
    result = acc.result()
    metrics = {
        "stq": result["STQ"], "aq": result["AQ"], "sq": result["SQ"],
        "num_sequences": len(records),
        "num_frames": int(sum(result["Length_per_seq"])),
    }
    per_sequence = {
        str(name): {"stq": s, "aq": a, "sq": q, "frames": n}
        for name, s, a, q, n in zip(
            result["ID_per_seq"], result["STQ_per_seq"],
            result["AQ_per_seq"], result["IoU_per_seq"],
            result["Length_per_seq"], strict=True)}
    return metrics, {"per_sequence": per_sequence}

  def write_sequence(self, out_dir: epath.Path, name: str,
                     pred: tuple[np.ndarray, np.ndarray]) -> None:
    """One STEP PNG (train id, track id) per frame."""
    train_ids, track_ids = pred
    frame_names = self.source.frame_names(name)[:len(train_ids)]
    for frame_name, sem, track in zip(frame_names, train_ids, track_ids,
                                      strict=True):
      step_format.write_step_png(
          out_dir / name / f"{frame_name}.png", sem, track)
