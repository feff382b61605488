"""DAVIS 2017 J&F of whole sequences segmented frame by frame.

For every eval sequence: preprocess each frame as for images (resize the
longer side to the image size, pad), pad the sequence to a multiple of
`length_bucket` frames (repeating the last frame, so one compiled program
serves every length in a bucket), run the video predict function (first
frame with `diffusion.sample_steps` steps, later frames conditioned on the
model's own previous masks), crop the padding, resize the masks to the
original frame size (nearest) and keep the instance ids of "thing" pixels as
DAVIS object ids. Ids are renumbered 1..k per sequence by first appearance
(the same object keeps its number in every frame), keeping at most the 20
largest objects the unsupervised protocol accepts. Results are written as
DAVIS palette PNGs (`<workdir>/predictions/<name>_step<step>/<seq>/<frame>.png`,
the layout `python -m pix2seq_d_jax.evaluation.davis` reads) and scored in
memory with the davis2017-evaluation-exact `evaluation.davis` functions.
Global batches hold consecutive sequences, each process taking its block of
rows and writing its sequences' PNGs; per-object statistics are gathered
over processes in sequence order, so the metrics equal a single-process
run's exactly. Process 0 writes them, with the per-object J and F means, to
`metrics.json` in the results folder.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from pix2seq_d_jax import sharding
from pix2seq_d_jax.evaluation import davis as davis_eval
from pix2seq_d_jax.evaluators import base, postprocess, register
from pix2seq_d_jax.formats import atomic
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
    image_size: int,
    is_thing: np.ndarray,
) -> np.ndarray:
  """DAVIS object ids of one sequence from its mask-resolution predictions.

  Crops the padding (the mask pixels that cover any of the `valid_size`
  content, ceil(valid / stride), as the image post-processing does), resizes
  to the original frame size by nearest neighbour, then `result_ids`.

  Args:
    semantic, instance: int [T, m, m] predictions of the real frames.
    valid_size: (h, w) of the resized frame inside the padded image.
    orig_size: (H, W) of the frames.
    image_size: S, the padded input size.
    is_thing: bool [num_classes].

  Returns:
    uint8 [T, H, W].
  """
  valid = postprocess.valid_mask_size(
      valid_size, image_size, semantic.shape[-1])
  size = tuple(int(v) for v in orig_size)
  # Semantic and instance stacked on a channel axis: one resize per frame.
  both = np.stack([
      postprocess.crop_and_resize_to_original(np.stack(pair, -1), valid, size)
      for pair in zip(semantic, instance, strict=True)
  ])
  return result_ids(both[..., 0], both[..., 1], np.asarray(is_thing, bool))


@register("davis_video")
class DavisVideoEvaluator(base.Evaluator):
  """J&F-Mean, J/F Mean, Recall and Decay over a DAVIS-layout split."""

  def __init__(self, *, name: str, source: Any, **kwargs: Any):
    """See `base.Evaluator`; `source` must be a video source."""
    for attr in ("sequence_names", "read_sequence", "frame_names"):
      if not hasattr(source, attr):
        raise ValueError(
            f"config.evals.{name}.type='davis_video' needs a video source "
            f"(config.input.source such as 'davis' or 'synthetic_video'); "
            f"{type(source).__name__} has no {attr}")
    super().__init__(name=name, source=source, **kwargs)
    config = self.config
    self.task = config.get("task", "unsupervised")
    self.things = np.asarray(source.metadata.is_thing, bool)
    names = list(source.sequence_names)
    if config.get("max_sequences"):
      names = names[:config.max_sequences]
    self.names = names

  def _global_batches(self) -> list[list[int]]:
    """Sequence indices of every global batch (-1 = padding)."""
    b = self.config.batch_size
    count = math.ceil(len(self.names) / b)
    idx = list(range(len(self.names))) + [-1] * (count * b - len(self.names))
    return [idx[i * b:(i + 1) * b] for i in range(count)]

  def _frames(self, index: int) -> tuple[dict, np.ndarray]:
    """Preprocessed frames [T, S, S, 3] and GT ids [T, H, W] of a sequence."""
    seq = self.source.read_sequence(self.names[index])
    frames = [
        self.preprocess_fn({k: seq[k][t] for k in (
            "image", "semantic", "instance", "crowd")} | {"image_id": 0})
        for t in range(seq["image"].shape[0])
    ]
    gt = np.where(seq["semantic"] == 0, davis_eval.VOID_LABEL,
                  np.where(self.things[seq["semantic"]], seq["instance"], 0))
    return {
        "image": np.stack([f["image"] for f in frames]),
        "valid_size": frames[0]["valid_size"],
    }, gt

  def run(self, params: Any, batch_stats: Any, *, step: int) -> dict:
    """Segments every eval sequence and returns the J&F metrics."""
    out_dir = (epath.Path(self.workdir) / "predictions"
               / f"{self.name}_step{step}")
    bucket = int(self.config.get("length_bucket", 16))
    rng = jax.random.key(self.seed)
    nproc, pid = jax.process_count(), jax.process_index()
    local_b = self.config.batch_size // nproc
    records = []
    for i, batch in enumerate(self._global_batches()):
      mine = batch[pid * local_b:(pid + 1) * local_b]
      lengths = [self.source.num_frames(self.names[j]) for j in batch
                 if j >= 0]
      length = bucket * math.ceil(max(lengths) / bucket)
      loaded = [self._frames(j if j >= 0 else batch[0]) for j in mine]
      images = np.stack([
          np.concatenate([f["image"], np.repeat(
              f["image"][-1:], length - len(f["image"]), axis=0)])
          for f, _ in loaded])
      arrays = sharding.global_batch(
          {"image": images}, self.mesh, self.rules)
      semantic, instance = self.predict_fn(
          params, batch_stats, arrays["image"], jax.random.fold_in(rng, i))
      semantic, instance = base.local_rows(semantic), base.local_rows(instance)
      for row, (j, (frames, gt)) in enumerate(zip(mine, loaded, strict=True)):
        if j < 0:
          continue
        ids = self._to_original(semantic[row], instance[row], frames, gt)
        name = self.names[j]
        self._write(out_dir, name, ids)
        j_all, f_all = davis_eval.evaluate_sequence_ids(gt, ids, self.task)
        rows = [[float(v) for v in (*davis_eval.db_statistics(j_all[k]),
                                    *davis_eval.db_statistics(f_all[k]))]
                for k in range(j_all.shape[0])]
        records.append({"index": j, "name": name, "rows": rows})
    # Every process's objects in sequence order: the means are then summed
    # in the order a single process sums them.
    records = base.gather_records(records)
    stats = np.asarray([row for r in records for row in r["rows"]],
                       np.float64).reshape(-1, 6)
    metrics = {key: float(np.mean(stats[:, c])) if len(stats) else 0.0
               for c, key in enumerate(_STATS)}
    metrics["J&F-Mean"] = (metrics["J-Mean"] + metrics["F-Mean"]) / 2
    metrics["num_objects"] = int(len(stats))
    if jax.process_index() == 0:
      per_sequence = {
          f"{r['name']}_{k + 1}": {"J-Mean": row[0], "F-Mean": row[3]}
          for r in records for k, row in enumerate(r["rows"])}
      atomic.write_json(
          out_dir / "metrics.json",
          dict(metrics, num_sequences=len(records),
               per_sequence=per_sequence), indent=2)
    # The reporter logs one formatted line per evaluation; this is detail.
    logging.debug("eval/%s at step %d: %s", self.name, step, metrics)
    return metrics

  def _to_original(self, semantic, instance, frames, gt) -> np.ndarray:
    """Crops padding, resizes to the frame size, maps to DAVIS ids."""
    t = gt.shape[0]
    return sequence_object_ids(
        semantic[:t], instance[:t], valid_size=frames["valid_size"],
        orig_size=gt.shape[1:], image_size=frames["image"].shape[1],
        is_thing=self.things)

  def _write(self, out_dir: epath.Path, name: str, ids: np.ndarray) -> None:
    for frame_name, frame_ids in zip(self.source.frame_names(name), ids,
                                     strict=True):
      davis_format.write_palette_png(
          out_dir / name / f"{frame_name}.png", frame_ids)
