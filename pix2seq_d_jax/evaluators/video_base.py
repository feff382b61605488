"""The evaluation loop shared by the whole-sequence video evaluators.

`VideoSequenceEvaluator` segments every eval sequence with the video predict
function: each frame is preprocessed as for images (resize to fit the
(height, width) image size, pad), each sequence padded to a multiple of
`length_bucket` frames (repeating the last frame, so one compiled program
serves every length in a bucket), and the masks of the real frames cropped
and resized to the original frame size (nearest,
`postprocess.sequence_to_original`). Global batches hold consecutive
sequences, each process taking its block of rows, scoring and writing its
own sequences; the per-sequence records are gathered over processes in
sequence order (`base.gather_records`), so the metrics equal a
single-process run's exactly, and process 0 writes them to `metrics.json`
in `<workdir>/predictions/<name>_step<step>/`, next to the prediction files.
Subclasses say what ground truth to read, how to map the predictions, score
and write one sequence, and how to turn the records into metrics.

Config fields read here: `batch_size`, `max_sequences` (the first N
sequences), `max_frames` (the first N frames of each), `length_bucket`
(default 16) and `write_predictions` (default True).
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import jax
import numpy as np
from absl import logging
from etils import epath

from pix2seq_d_jax import sharding
from pix2seq_d_jax.evaluators import base, postprocess
from pix2seq_d_jax.formats import atomic

# Per-frame fields a video source returns that the eval preprocessing reads.
_FRAME_KEYS = ("image", "semantic", "instance", "crowd")


class VideoSequenceEvaluator(base.Evaluator):
  """Segments whole sequences; subclasses fill in the scoring hooks."""

  # The evaluator's `type` and example sources, for the source check's error.
  TYPE: ClassVar[str]
  EXAMPLE_SOURCES: ClassVar[str]
  # The source methods the evaluator needs.
  SOURCE_ATTRS: ClassVar[tuple[str, ...]] = (
      "sequence_names", "read_sequence", "frame_names", "num_frames")

  def __init__(self, *, name: str, source: Any, **kwargs: Any):
    """See `base.Evaluator`; `source` must be a video source.

    Raises:
      ValueError: if `source` lacks one of `SOURCE_ATTRS`, or as
        `base.Evaluator` on the batch size.
    """
    for attr in self.SOURCE_ATTRS:
      if not hasattr(source, attr):
        raise ValueError(
            f"config.evals.{name}.type='{self.TYPE}' needs a video source "
            f"(config.input.source such as {self.EXAMPLE_SOURCES}); "
            f"{type(source).__name__} has no {attr}")
    super().__init__(name=name, source=source, **kwargs)
    self.things = np.asarray(source.metadata.is_thing, bool)
    names = list(source.sequence_names)
    if self.config.get("max_sequences"):
      names = names[:self.config.max_sequences]
    self.names = names
    self.max_frames = self.config.get("max_frames")

  # ------------------------------------------------------------------ hooks

  @abc.abstractmethod
  def ground_truth(self, semantic: np.ndarray, instance: np.ndarray) -> Any:
    """A sequence's ground truth as `score_sequence` reads it.

    Args:
      semantic, instance: int [T, H, W] the source's classes and instance
        ids of the evaluated frames.
    """

  @abc.abstractmethod
  def to_predictions(self, semantic: np.ndarray,
                     instance: np.ndarray) -> Any:
    """A sequence's predictions as `score_sequence` and `write_sequence` read.

    Args:
      semantic, instance: int [T, H, W] predicted classes and instance ids
        at the original frame size.
    """

  @abc.abstractmethod
  def score_sequence(self, name: str, gt: Any, pred: Any) -> dict[str, Any]:
    """The JSON-serialisable record fields of one sequence."""

  @abc.abstractmethod
  def write_sequence(self, out_dir: epath.Path, name: str, pred: Any) -> None:
    """Writes one sequence's prediction files under `out_dir / name`."""

  @abc.abstractmethod
  def summarize(
      self, records: list[dict[str, Any]]
  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, fields added to metrics.json) from every sequence's record.

    Args:
      records: every process's records in sequence order, each with `index`
        and `name` besides the `score_sequence` fields.
    """

  # ------------------------------------------------------------------- loop

  def _global_batches(self) -> list[list[int]]:
    """Sequence indices of every global batch (-1 = padding)."""
    b = self.config.batch_size
    count = math.ceil(len(self.names) / b)
    idx = list(range(len(self.names))) + [-1] * (count * b - len(self.names))
    return [idx[i * b:(i + 1) * b] for i in range(count)]

  def _num_frames(self, index: int) -> int:
    """The evaluated frames of sequence `index` (at most `max_frames`)."""
    n = self.source.num_frames(self.names[index])
    return min(n, self.max_frames) if self.max_frames else n

  def _load(self, index: int) -> tuple[dict[str, Any], Any]:
    """Preprocessed frames of sequence `index` and its ground truth.

    Returns:
      ({'image': float32 [T, H, W, 3], 'valid_size': (h, w) of the content,
      'orig_size': (H, W)}, `ground_truth(...)`).
    """
    seq = self.source.read_sequence(self.names[index])
    t = self._num_frames(index)
    frames = [
        self.preprocess_fn({k: seq[k][i] for k in _FRAME_KEYS}
                           | {"image_id": 0})
        for i in range(t)
    ]
    semantic, instance = seq["semantic"][:t], seq["instance"][:t]
    return {
        "image": np.stack([f["image"] for f in frames]),
        "valid_size": frames[0]["valid_size"],
        "orig_size": semantic.shape[1:],
    }, self.ground_truth(semantic, instance)

  def run(self, params: Any, batch_stats: Any, *, step: int) -> dict:
    """Segments every eval sequence and returns the metrics."""
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
      # Padding rows segment the batch's first sequence and are dropped.
      loaded = [self._load(j if j >= 0 else batch[0]) for j in mine]
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
        t = len(frames["image"])
        pred = self.to_predictions(*postprocess.sequence_to_original(
            semantic[row, :t], instance[row, :t],
            valid_size=frames["valid_size"], orig_size=frames["orig_size"],
            image_size=frames["image"].shape[1:3]))
        name = self.names[j]
        if write:
          self.write_sequence(out_dir, name, pred)
        records.append({"index": j, "name": name,
                        **self.score_sequence(name, gt, pred)})
    # Every process's sequences in sequence order: the metrics are then
    # accumulated in the order a single process accumulates them.
    records = base.gather_records(records)
    metrics, details = self.summarize(records)
    if jax.process_index() == 0:
      atomic.write_json(out_dir / "metrics.json", dict(metrics, **details),
                        indent=2)
    # The reporter logs one formatted line per evaluation; this is detail.
    logging.debug("eval/%s at step %d: %s", self.name, step, metrics)
    return metrics
