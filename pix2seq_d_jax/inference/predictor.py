"""The image Predictor: a restored model and its jitted, batched sampler.

A `Predictor` holds the inference weights (EMA params and batch statistics,
never the optimizer state) and one jitted sampler; `predict(images)`
resizes and pads each image as evaluation does, samples, and
post-processes the masks into COCO panoptic segments at the image's
original size. Every image is sampled from the same starting noise
(`config.seed`) and the batch is vmapped per image, so a prediction does
not depend on the other inputs, their order or the batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from pix2seq_d_jax import config_lib, sharding
from pix2seq_d_jax.data import preprocess
from pix2seq_d_jax.diffusion import analog_bits
from pix2seq_d_jax.evaluators import postprocess

# Object ids a palette PNG can hold (uint8, 0 = background).
_MAX_OBJECT_ID = 255


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The prediction for one image.

  Attributes:
    segment_ids: int32 [H, W] at the image's original size, 0 = void.
    segments_info: COCO panoptic segments `{id, category_id (dataset id),
      area, bbox, iscrowd, isthing}`; areas and boxes are those of
      `segment_ids`.
    semantic: int32 [h, w] decoded classes at mask resolution, padding
      cropped (before post-processing).
    instance: int32 [h, w] decoded instance ids, like `semantic`.
    instance_original: int32 [H, W] the instance ids at the original size
      (`postprocess.resize_to_original`), the map the segments were built
      from.
    trajectory: None, or (semantic, instance), each int32 [steps, h, w]: the
      mask decoded from the x0 estimate of every sampling step; the last step
      equals (semantic, instance).
  """

  segment_ids: np.ndarray
  segments_info: list[dict[str, Any]]
  semantic: np.ndarray
  instance: np.ndarray
  instance_original: np.ndarray
  trajectory: tuple[np.ndarray, np.ndarray] | None = None

  def object_ids(self) -> np.ndarray:
    """DAVIS object ids: uint8 [H, W] at the original size.

    A pixel of a thing segment gets the segment's predicted instance id,
    every other pixel (stuff, void, dropped fragments) 0; the ids are read
    from `instance_original`, the map the segments were built from.
    """
    things = [s["id"] for s in self.segments_info if s["isthing"]]
    ids = np.where(np.isin(self.segment_ids, things),
                   self.instance_original, 0)
    if ids.max(initial=0) > _MAX_OBJECT_ID:
      raise ValueError(
          f"instance id {ids.max()} > {_MAX_OBJECT_ID}: palette PNGs hold "
          "object ids 1..255; lower config.input.max_instances to <= 256"
      )
    return ids.astype(np.uint8)


def check_steps(flag: str, value: Any) -> int:
  """Returns a positive int step count; the error names the flag."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise config_lib.ConfigError(
        f"{flag}={value!r}: expected a positive integer"
    )
  return value


class Predictor:
  """A restored model and its jitted, batched image sampler.

  A frame-conditioned (video) model segments each image as the first frame
  of a sequence: zero maps stand for the earlier frames, and the image uses
  the key of frame 0 of the video sampler, so an image gets the
  masks a 1-frame sequence would get.

  Build one with `predict.load_predictor(config, checkpoint)`, or from an
  `experiment.Experiment` and its restored inference weights.

  Args:
    exp: the run's `Experiment` (model, mesh, shardings, config).
    weights: `(params, batch_stats)` to sample with (the EMA params of a
      checkpoint: `Experiment.restore_inference_weights`).
    metadata: the dataset's `PanopticMetadata` (`Experiment.
      eval_metadata()`): classes, things, category ids.
    steps: sampling steps; None = `config.diffusion.sample_steps`.
    with_trajectory: also decode every step's x0 estimate.
    batch_size: images per jitted call; None = `config.evals.panoptic.
      batch_size` (else `config.input.batch_size`). A multiple of the
      data-parallel device count.

  Raises:
    ConfigError: bad steps or batch size.
  """

  def __init__(
      self,
      exp: Any,
      weights: tuple[Any, Any],
      metadata: Any,
      *,
      steps: int | None = None,
      with_trajectory: bool = False,
      batch_size: int | None = None,
  ):
    config = exp.config
    self.exp = exp
    self.config = config
    self.video = exp.is_video
    self.steps = check_steps(
        "--steps", config.diffusion.sample_steps if steps is None else steps
    )
    self.with_trajectory = with_trajectory
    self.meta = metadata
    panoptic_eval = config.evals.get("panoptic")
    self.min_pixels = (
        panoptic_eval.min_pixels if panoptic_eval is not None else 40
    )
    if batch_size is None:
      batch_size = default_batch_size(config)
    self.mesh = exp.mesh
    dp = exp.data_parallel_size
    if batch_size < 1 or batch_size % dp:
      raise config_lib.ConfigError(
          f"--batch_size={batch_size}: expected a positive multiple of the "
          f"{dp} data-parallel devices"
      )
    self.batch_size = batch_size
    self.model = exp.model
    self.shardings = exp.state_shardings
    self.params, self.batch_stats = weights
    self._predict = self._make_predict_fn()
    self.rng = jax.random.key(config.seed)
    # Frame t of a sequence samples with key fold_in(rng, t)
    # (`sampling.make_video_predict_fn`); an image is frame 0.
    self._image_rng = (
        jax.random.fold_in(self.rng, 0) if self.video else self.rng
    )

  def _make_predict_fn(self):
    d = self.config.diffusion
    num_classes = self.meta.num_classes
    max_instances = self.config.input.max_instances
    shardings = self.shardings
    sample = self.exp.predict_fn(
        num_classes, num_steps=self.steps,
        return_trajectory=self.with_trajectory,
    )

    def one_image(params, batch_stats, image, rng):
      # A batch of one under vmap: every image starts from the same noise,
      # whatever the batch it is in.
      out = sample(params, batch_stats, image[None], rng)
      semantic, instance = out[0][0], out[1][0]
      if not self.with_trajectory:
        return semantic, instance
      steps_sem, steps_inst = analog_bits.analog_bits_to_mask(
          out[2]["x0"][:, 0], bits_per_channel=d.bits_per_channel,
          num_classes=num_classes, max_instances=max_instances,
          code=d.bit_code,
      )
      return semantic, instance, steps_sem, steps_inst

    batch = self.exp.batch_sharding
    return jax.jit(
        jax.vmap(one_image, in_axes=(None, None, 0, None)),
        in_shardings=(shardings.ema_params, shardings.batch_stats, batch,
                      sharding.replicated(self.mesh)),
        out_shardings=batch,
    )

  def preprocess(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Resizes (to fit image_size) and pads one uint8 [h, w, 3] image.

    Returns:
      `preprocess.preprocess_eval`'s dict (image float32 [H, W, 3] at the
      config's (height, width) image size, orig_size and valid_size int32
      [2], ...).
    """
    h, w = image.shape[:2]
    zeros = np.zeros((h, w), np.int32)
    raw = {"image": image, "semantic": zeros, "instance": zeros,
           "crowd": zeros.astype(bool), "image_id": 0}
    image_hw, mask_hw = config_lib.input_sizes(self.config.input)
    return preprocess.preprocess_eval(
        raw, image_size=image_hw, mask_size=mask_hw)

  def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
    """Segments images in fixed-size batches (the last one padded).

    Args:
      images: uint8 [h, w, 3] images of any sizes.

    Returns:
      One `Prediction` per image, in order.
    """
    results = []
    for start in range(0, len(images), self.batch_size):
      chunk = [self.preprocess(im) for im in
               images[start : start + self.batch_size]]
      pixels = np.stack([ex["image"] for ex in chunk])
      pad = self.batch_size - len(chunk)
      pixels = np.pad(pixels, ((0, pad), (0, 0), (0, 0), (0, 0)))
      arrays = sharding.global_batch(
          {"image": pixels}, self.mesh, self.config.sharding_rules)
      with jax.set_mesh(self.mesh):
        out = self._predict(
            self.params, self.batch_stats, arrays["image"], self._image_rng
        )
      out = [np.asarray(x) for x in out]
      for j, ex in enumerate(chunk):
        results.append(self._postprocess(ex, [x[j] for x in out]))
      logging.info("Predicted %d of %d images.", len(results), len(images))
    return results

  def _postprocess(self, ex: dict, out: list[np.ndarray]) -> Prediction:
    valid = postprocess.valid_mask_size(
        ex["valid_size"], *config_lib.input_sizes(self.config.input))
    semantic, instance = (x[: valid[0], : valid[1]] for x in out[:2])
    sizes = dict(valid_size=[int(v) for v in ex["valid_size"]],
                 image_size=ex["image"].shape[:2],
                 orig_size=[int(v) for v in ex["orig_size"]])
    # Resized to the image first, then segments and the size rule there.
    ids, segments = postprocess.panoptic_at_original(
        out[0], out[1], **sizes,
        is_thing=self.meta.is_thing, min_pixels=self.min_pixels,
        stuff_identity=self.config.input.get(
            "stuff_identity", config_lib.STUFF_IDENTITY_DEFAULT),
    )
    trajectory = None
    if self.with_trajectory:
      trajectory = tuple(x[:, : valid[0], : valid[1]] for x in out[2:])
    return Prediction(
        segment_ids=ids.astype(np.int32),
        segments_info=postprocess.recount_segments(
            ids, segments, self.meta.class_to_category_id),
        semantic=semantic,
        instance=instance,
        instance_original=postprocess.resize_to_original(
            out[1], **sizes).astype(np.int32),
        trajectory=trajectory,
    )


def default_batch_size(config: ml_collections.ConfigDict) -> int:
  """Images per call when none is given: the panoptic eval's batch size."""
  panoptic_eval = config.evals.get("panoptic")
  if panoptic_eval is not None:
    return panoptic_eval.batch_size
  return config.input.batch_size
