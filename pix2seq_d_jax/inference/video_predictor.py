"""The VideoPredictor: whole sequences through a frame-conditioned model.

For configs whose model reads its own masks of earlier frames
(`config.input.proceeding_frames`). Each batch of sequences runs through
`sampling.make_video_predict_fn` in one jitted call: the encoder over all
frames, the first frame sampled with `steps` (`diffusion.sample_steps`),
every later frame with `steps_later` (`diffusion.sample_steps_later`)
conditioned on the masks predicted for the frames before it, so an object
keeps its instance id through the sequence.

Preprocessing, the padding of T to a multiple of `length_bucket` (the last
frame repeated, so one compiled program serves every length in a bucket;
the frame scan is causal, so padding never changes the real frames) and the
mapping to DAVIS object ids (`davis_video.result_ids`: thing pixels,
renumbered 1..k by first appearance, at most the 20 largest objects) are
those of the in-training `davis_video` evaluator, so the written PNGs are
what its J&F scores. Unlike the evaluator, every sequence samples from the
same key (`config.seed`) and sequences are vmapped, so a sequence's result
does not depend on the others, their order or the batch size.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from pix2seq_d_jax import config_lib, sharding
from pix2seq_d_jax.evaluators import davis_video
from pix2seq_d_jax.formats import paths
from pix2seq_d_jax.inference import predictor

# Sequences are padded to a multiple of this many frames by default.
DEFAULT_LENGTH_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class ClipPrediction:
  """The prediction for one sequence.

  Attributes:
    object_ids: uint8 [T, H, W] DAVIS object ids at the frames' original
      size (0 = background, stuff and void; 1..k objects, one id per object
      over the whole sequence).
    frames: one `predictor.Prediction` per frame (panoptic segments after the
      image post-processing, for overlays and inspection).
  """

  object_ids: np.ndarray
  frames: list[predictor.Prediction]


def padded_length(num_frames: int, bucket: int) -> int:
  """The smallest multiple of `bucket` that holds `num_frames` (>= 1)."""
  return bucket * max(1, math.ceil(num_frames / bucket))


def check_frame_sizes(sequences: Sequence[tuple[str, Sequence[str]]]) -> None:
  """Checks that the frames of every sequence share one size.

  Only the file headers are read, so a bad sequence fails before the model
  is restored. One size per sequence is what lets the padding of frame 0
  crop every frame's masks.

  Raises:
    ValueError: the message names the sequence folder and two sizes.
  """
  for name, frames in sequences:
    sizes = {}
    for path in frames:
      try:
        # Through epath, so frames in a bucket work too; PIL reads only
        # the header from the open file.
        with paths.to_epath(path).open("rb") as f, Image.open(f) as im:
          sizes.setdefault(im.size, path)
      except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"Cannot decode image {path}: {e}") from e
      if len(sizes) > 1:
        (w0, h0), (w1, h1) = sizes
        first, other = sizes.values()
        folder = os.path.dirname(paths.absolute(path))
        raise ValueError(
            f"sequence {name!r} ({folder}): frames must share one size, but "
            f"{os.path.basename(first)} is {h0}x{w0} and "
            f"{os.path.basename(other)} is {h1}x{w1} (height x width)"
        )


def default_batch_size(
    config: ml_collections.ConfigDict, num_sequences: int
) -> int:
  """Sequences per jitted call when the user gives none.

  The batch size of the config's `davis_video` eval if it has one, else one
  sequence per data-parallel device; never more than the sequences (rounded
  up to the devices), so a few sequences are not padded to a large batch.
  """
  dp = sharding.data_parallel_size(
      sharding.make_mesh(config.mesh), config.sharding_rules)
  sizes = [ev.batch_size for ev in config.evals.values()
           if ev.get("type") == "davis_video"]
  return min(sizes[0] if sizes else dp, -(-num_sequences // dp) * dp)


class VideoPredictor(predictor.Predictor):
  """A restored frame-conditioned model and its jitted sequence sampler.

  `predict(images)` (inherited) segments single images as first frames;
  `predict_clips(clips)` segments whole sequences.

  Args:
    exp: the `Experiment` of a video config (non-empty
      `input.proceeding_frames`).
    weights: `(params, batch_stats)` to sample with.
    metadata: the dataset's `PanopticMetadata`.
    steps: sampling steps of the first frame; None =
      `config.diffusion.sample_steps`.
    steps_later: sampling steps of every later frame; None =
      `config.diffusion.sample_steps_later` (else `steps`).
    batch_size: sequences per jitted call (and images per call for
      `predict`); None = `default_batch_size` for one sequence. A multiple
      of the data-parallel device count.
    length_bucket: sequences are padded to a multiple of this many frames.

  Raises:
    ConfigError: an image-model config, or bad steps, batch size or bucket.
  """

  def __init__(
      self,
      exp: Any,
      weights: tuple[Any, Any],
      metadata: Any,
      *,
      steps: int | None = None,
      steps_later: int | None = None,
      batch_size: int | None = None,
      length_bucket: int = DEFAULT_LENGTH_BUCKET,
  ):
    config = exp.config
    frames = tuple(config.input.get("proceeding_frames") or ())
    if not frames:
      raise config_lib.ConfigError(
          "config.input.proceeding_frames=(): VideoPredictor needs a model "
          "conditioned on earlier frames; use Predictor for image models"
      )
    self.length_bucket = check_bucket(length_bucket)
    later = steps_later
    if later is None:
      later = config.diffusion.get("sample_steps_later") or (
          config.diffusion.sample_steps if steps is None else steps)
    self.steps_later = predictor.check_steps("--steps_later", later)
    if batch_size is None:
      batch_size = default_batch_size(config, 1)
    super().__init__(exp, weights, metadata, steps=steps,
                     batch_size=batch_size)
    self._predict_clips = self._make_clip_fn()

  def _make_clip_fn(self):
    video = self.exp.video_predict_fn(
        self.meta.num_classes, first_frame_steps=self.steps,
        later_frame_steps=self.steps_later,
    )

    def one_clip(params, batch_stats, frames, rng):
      # A batch of one under vmap: every sequence samples from the same
      # keys, whatever the batch it is in.
      semantic, instance = video(params, batch_stats, frames[None], rng)
      return semantic[0], instance[0]

    batch = self.exp.batch_sharding
    return jax.jit(
        jax.vmap(one_clip, in_axes=(None, None, 0, None)),
        in_shardings=(self.shardings.ema_params, self.shardings.batch_stats,
                      batch, sharding.replicated(self.mesh)),
        out_shardings=batch,
    )

  def predict_clips(
      self, clips: Sequence[Sequence[np.ndarray]]
  ) -> list[ClipPrediction]:
    """Segments whole sequences, `batch_size` at a time (the last padded).

    Args:
      clips: per sequence, its uint8 [H, W, 3] frames in order (at least
        one); the frames of a sequence share one size.

    Returns:
      One `ClipPrediction` per sequence, in order.

    Raises:
      ValueError: an empty sequence, or frames of different sizes.
    """
    results = []
    for start in range(0, len(clips), self.batch_size):
      chunk = []
      for k, clip in enumerate(clips[start : start + self.batch_size]):
        _check_clip(start + k, clip)
        chunk.append([self.preprocess(frame) for frame in clip])
      length = padded_length(max(len(c) for c in chunk), self.length_bucket)
      pixels = np.zeros(
          (self.batch_size, length) + chunk[0][0]["image"].shape, np.float32)
      for row, examples in enumerate(chunk):
        frames = np.stack([ex["image"] for ex in examples])
        pixels[row, : len(frames)] = frames
        # Repeated last frames, as the evaluator pads (then dropped).
        pixels[row, len(frames):] = frames[-1]
      arrays = sharding.global_batch(
          {"image": pixels}, self.mesh, self.config.sharding_rules)
      with jax.set_mesh(self.mesh):
        out = self._predict_clips(
            self.params, self.batch_stats, arrays["image"], self.rng)
      semantic, instance = (np.asarray(x) for x in out)
      for row, examples in enumerate(chunk):
        t = len(examples)
        sem, inst = semantic[row, :t], instance[row, :t]
        ids = davis_video.sequence_object_ids(
            sem, inst, valid_size=examples[0]["valid_size"],
            orig_size=examples[0]["orig_size"],
            image_size=config_lib.size_hw(
                self.config.input.image_size, "config.input.image_size"),
            is_thing=self.meta.is_thing,
        )
        frames = [self._postprocess(ex, [s, i])
                  for ex, s, i in zip(examples, sem, inst, strict=True)]
        results.append(ClipPrediction(object_ids=ids, frames=frames))
      logging.info("Predicted %d of %d sequences (%d frames each padded to "
                   "%d).", len(results), len(clips),
                   max(len(c) for c in chunk), length)
    return results


def check_bucket(length_bucket: Any) -> int:
  """Returns a positive int bucket; the error names the flag."""
  if (isinstance(length_bucket, bool) or not isinstance(length_bucket, int)
      or length_bucket < 1):
    raise config_lib.ConfigError(
        f"--length_bucket={length_bucket!r}: expected a positive integer"
    )
  return length_bucket


def _check_clip(index: int, clip: Sequence[np.ndarray]) -> None:
  if not len(clip):
    raise ValueError(f"sequence {index}: expected at least one frame")
  shapes = {tuple(np.shape(f)[:2]) for f in clip}
  if len(shapes) > 1:
    raise ValueError(
        f"sequence {index}: frames must share one size, got (height, width) "
        f"{sorted(shapes)}"
    )
