"""DAVIS 2017 J&F of whole sequences segmented frame by frame.

The loop is `video_base.VideoSequenceEvaluator`'s: frames preprocessed as
images, sequences padded to a multiple of `length_bucket` frames, the video
predict function (first frame with `diffusion.sample_steps` steps, later
frames conditioned on the model's own previous masks), the padding cropped
and the masks resized to the original frame size (nearest), per-sequence
records gathered over processes in sequence order so the metrics equal a
single-process run's. Here the instance ids of "thing" pixels are DAVIS
object ids, renumbered 1..k per sequence by first appearance (the same
object keeps its number in every frame), keeping at most the 20 largest
objects the unsupervised protocol accepts. Results are written as DAVIS
palette PNGs (`<workdir>/predictions/<name>_step<step>/<seq>/<frame>.png`,
the layout `python -m pix2seq_d_jax.evaluation.davis` reads) and scored in
memory with the davis2017-evaluation-exact `evaluation.davis` functions;
process 0 writes the metrics, with the per-object J and F means, to
`metrics.json` in the results folder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from pix2seq_d_jax.evaluation import davis as davis_eval
from pix2seq_d_jax.evaluators import postprocess, register, video_base
from pix2seq_d_jax.formats import davis as davis_format

# Per-object statistics, in the order of davis_eval.GLOBAL_MEASURES' parts.
_STATS = ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def result_ids(semantic: np.ndarray, instance: np.ndarray,
               thing_classes: np.ndarray) -> np.ndarray:
  """DAVIS object ids of one sequence from predicted panoptic maps.

  Args:
    semantic, instance: int [t, h, w] predictions of every frame.
    thing_classes: bool [num_classes], True for classes with instances.

  Returns:
    uint8 [t, h, w]: 0 background, objects renumbered 1..k (k <= 20) by
    first appearance (frame, then raster order); beyond 20 objects only the
    largest 20 (total pixels over the sequence) are kept.
  """
  ids = np.where(thing_classes[np.clip(semantic, 0, len(thing_classes) - 1)],
                 instance, 0)
  flat = ids.ravel()
  present, first = np.unique(flat, return_index=True)
  keep = present[present > 0]
  first = first[present > 0]
  if len(keep) > davis_eval.MAX_PROPOSALS:
    area = np.bincount(flat, minlength=int(keep.max()) + 1)[keep]
    largest = np.sort(np.argsort(-area, kind="stable")[
        :davis_eval.MAX_PROPOSALS])
    keep, first = keep[largest], first[largest]
  order = keep[np.argsort(first, kind="stable")]
  lut = np.zeros(int(max(flat.max(), 0)) + 1, np.uint8)
  lut[order] = np.arange(1, len(order) + 1, dtype=np.uint8)
  return lut[ids]


def sequence_object_ids(
    semantic: np.ndarray,
    instance: np.ndarray,
    *,
    valid_size: tuple[int, int] | np.ndarray,
    orig_size: tuple[int, int] | np.ndarray,
    image_size: int | tuple[int, int],
    is_thing: np.ndarray,
) -> np.ndarray:
  """DAVIS object ids of one sequence from its mask-resolution predictions.

  Brings the masks to the original frame size as the image
  post-processing does (`postprocess.sequence_to_original`: upsample to the
  padded input, crop the `valid_size` content, resize; nearest), then
  `result_ids`.

  Args:
    semantic, instance, valid_size, orig_size, image_size: as in
      `postprocess.sequence_to_original` (int [T, h', w'] predictions).
    is_thing: bool [num_classes].

  Returns:
    uint8 [T, H, W].
  """
  semantic, instance = postprocess.sequence_to_original(
      semantic, instance, valid_size=valid_size, orig_size=orig_size,
      image_size=image_size)
  return result_ids(semantic, instance, np.asarray(is_thing, bool))


@register("davis_video")
class DavisVideoEvaluator(video_base.VideoSequenceEvaluator):
  """J&F-Mean, J/F Mean, Recall and Decay over a DAVIS-layout split."""

  TYPE = "davis_video"
  EXAMPLE_SOURCES = "'davis' or 'synthetic_video'"
  SOURCE_ATTRS = ("sequence_names", "read_sequence", "frame_names")

  def __init__(self, *, name: str, source: Any, **kwargs: Any):
    """See `video_base.VideoSequenceEvaluator`."""
    super().__init__(name=name, source=source, **kwargs)
    self.task = self.config.get("task", "unsupervised")

  def ground_truth(self, semantic: np.ndarray,
                   instance: np.ndarray) -> np.ndarray:
    """DAVIS ids [T, H, W]: void where unlabelled, 0 on stuff, else ids."""
    return np.where(semantic == 0, davis_eval.VOID_LABEL,
                    np.where(self.things[semantic], instance, 0))

  def to_predictions(self, semantic: np.ndarray,
                     instance: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W] DAVIS object ids (`result_ids`)."""
    return result_ids(semantic, instance, self.things)

  def score_sequence(self, name: str, gt: np.ndarray,
                     pred: np.ndarray) -> dict[str, Any]:
    """{'rows': per object, the `_STATS` of its J and F}."""
    del name
    j_all, f_all = davis_eval.evaluate_sequence_ids(gt, pred, self.task)
    rows = [[float(v) for v in (*davis_eval.db_statistics(j_all[k]),
                                *davis_eval.db_statistics(f_all[k]))]
            for k in range(j_all.shape[0])]
    return {"rows": rows}

  def summarize(
      self, records: list[dict[str, Any]]
  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Means over every object of every sequence; per-object J and F."""
    stats = np.asarray([row for r in records for row in r["rows"]],
                       np.float64).reshape(-1, 6)
    metrics = {key: float(np.mean(stats[:, c])) if len(stats) else 0.0
               for c, key in enumerate(_STATS)}
    metrics["J&F-Mean"] = (metrics["J-Mean"] + metrics["F-Mean"]) / 2
    metrics["num_objects"] = int(len(stats))
    per_sequence = {
        f"{r['name']}_{k + 1}": {"J-Mean": row[0], "F-Mean": row[3]}
        for r in records for k, row in enumerate(r["rows"])}
    return metrics, {"num_sequences": len(records),
                     "per_sequence": per_sequence}

  def write_sequence(self, out_dir: epath.Path, name: str,
                     pred: np.ndarray) -> None:
    """One DAVIS palette PNG per frame."""
    for frame_name, frame_ids in zip(self.source.frame_names(name), pred,
                                     strict=True):
      davis_format.write_palette_png(
          out_dir / name / f"{frame_name}.png", frame_ids)
