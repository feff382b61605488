r"""Panoptic segmentation of image files and videos with a trained checkpoint.

  python -m pix2seq_d_jax.predict --config=configs/synthetic.py \
      --checkpoint=/tmp/p2sd --input=photos/ --output=/tmp/p2sd_pred \
      [--steps=20] [--save_trajectory] [--batch_size=8] [--video]

  python -m pix2seq_d_jax.predict --config=configs/synthetic.py:video \
      --checkpoint=/tmp/p2sd_video --input=DAVIS/JPEGImages/480p \
      --output=/tmp/p2sd_video_pred [--steps=10] [--steps_later=5] \
      [--length_bucket=16] [--batch_size=2]

`--input` is one image file or a folder of images (JPEG, PNG, ...; read in
sorted order as independent images; colour, grey or RGBA, any size), or a
video (below). `--checkpoint` is a workdir, its `checkpoints/` folder or one
step folder; the EMA weights are used. The class names and which classes are
things come from the config's dataset (`config.input.source` /
`config.input.data_dir`), so predictions can be written with the dataset's
category ids. Written under `--output` for images:

  panoptic.json             COCO panoptic JSON (images, annotations,
                            categories) for all inputs.
  panoptic/<name>.png       COCO panoptic PNG at the input's original size.
  overlays/<name>.png       image | segments blended, class names drawn.
  trajectories/<name>.png   with --save_trajectory: the decoded mask of every
  trajectories/<name>.gif   sampling step, as a strip and as an animation.

Videos. `--input` is a video when `--video` is given (a folder of frames is
one sequence, named after the folder; a folder of such folders, e.g. DAVIS
`JPEGImages/480p/`, is one sequence per sub-folder) or, without the flag,
when it is a folder that holds no image file but sub-folders that do. Frames
are read in sorted order. For videos the DAVIS results format is written:

  <seq>/<frame>.png                palette PNG (PASCAL VOC / DAVIS colours)
                                   at the frame's size; value = an object
                                   id (1..255), 0 = background, stuff or
                                   void.
  overlays/<seq>/<frame>.png       as for images (and trajectories/ with
                                   --save_trajectory, image models only).

Image models (`config.input.proceeding_frames=()`) segment every frame
independently: a PNG holds the instance ids of the frame's thing segments,
which are not linked across frames. Frame-conditioned (video) models
segment each sequence as a whole (`predict_video`): the first frame with
`--steps`, every later one with `--steps_later` conditioned on the masks
the model predicted for the frames before it, so an object keeps its id
through the sequence. The PNG values are then the ids the in-training
DAVIS J&F evaluator scores (`davis_video.result_ids`: objects renumbered
1..k by first appearance, at most the 20 largest). The frames of a sequence
must share one size; sequences are padded to a multiple of
`--length_bucket` frames (the last frame repeated, its masks dropped), so
one compiled program serves every length in a bucket without changing any
result, and `--batch_size` counts sequences. A single image given to a
video model is a 1-frame sequence: it is conditioned on empty masks of the
earlier frames, as a sequence's first frame is.

Every image (every sequence) is sampled from the same starting noise
(`config.seed`) and the batch is vmapped per image (sequence), so a
prediction does not depend on the other inputs, their order or the batch
size. Errors of the user's making print one `error: ...` line and exit
with status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from pix2seq_d_jax import checkpointing, config_lib, sharding, train_state
from pix2seq_d_jax.data import panoptic_format, preprocess
from pix2seq_d_jax.diffusion import analog_bits
from pix2seq_d_jax.evaluation import davis as davis_eval
from pix2seq_d_jax.evaluators import postprocess, visualize

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"
)
# Output folders next to the sequence folders of a video prediction.
_VIDEO_EXTRAS = ("overlays", "trajectories")
# Object ids a palette PNG can hold (uint8, 0 = background).
_MAX_OBJECT_ID = 255
# Video models pad sequences to a multiple of this many frames by default.
DEFAULT_LENGTH_BUCKET = 16


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
    trajectory: None, or (semantic, instance), each int32 [steps, h, w]: the
      mask decoded from the x0 estimate of every sampling step; the last step
      equals (semantic, instance).
  """

  segment_ids: np.ndarray
  segments_info: list[dict[str, Any]]
  semantic: np.ndarray
  instance: np.ndarray
  trajectory: tuple[np.ndarray, np.ndarray] | None = None

  def object_ids(self) -> np.ndarray:
    """DAVIS object ids: uint8 [H, W] at the original size.

    A pixel of a thing segment gets the segment's predicted instance id,
    every other pixel (stuff, void, dropped fragments) 0. `instance` is
    resized with the same nearest-neighbour sampling as `segment_ids`, so
    each output pixel reads the mask pixel its segment id came from.
    """
    things = [s["id"] for s in self.segments_info if s["isthing"]]
    instance = postprocess.resize_nearest(
        self.instance, self.segment_ids.shape
    )
    ids = np.where(np.isin(self.segment_ids, things), instance, 0)
    if ids.max(initial=0) > _MAX_OBJECT_ID:
      raise ValueError(
          f"instance id {ids.max()} > {_MAX_OBJECT_ID}: palette PNGs hold "
          "object ids 1..255; lower config.input.max_instances to <= 256"
      )
    return ids.astype(np.uint8)


def list_images(inputs: str | Sequence[str]) -> list[str]:
  """Expands image files and folders into a list of image files.

  Args:
    inputs: an image file, a folder (its image files, non-recursive, sorted
      by name) or a sequence of those.

  Returns:
    The image paths in order.

  Raises:
    FileNotFoundError: a path does not exist, or no image was found.
  """
  if isinstance(inputs, str | os.PathLike):
    inputs = [inputs]
  paths = []
  for item in inputs:
    item = os.path.expanduser(os.fspath(item))
    if os.path.isdir(item):
      paths.extend(os.path.join(item, n) for n in _image_names(item))
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise FileNotFoundError(f"--input={item!r}: no such file or folder")
  if not paths:
    raise FileNotFoundError(
        f"--input={list(inputs)}: no image files (extensions "
        f"{', '.join(IMAGE_EXTENSIONS)})"
    )
  return paths


def _image_names(folder: str) -> list[str]:
  return sorted(
      n for n in os.listdir(folder)
      if not n.startswith(".")
      and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
      and os.path.isfile(os.path.join(folder, n))
  )


def _subfolders(folder: str) -> list[str]:
  return sorted(
      n for n in os.listdir(folder)
      if not n.startswith(".") and os.path.isdir(os.path.join(folder, n))
  )


def is_sequence_root(path: str) -> bool:
  """Whether `path` is a folder of sequence folders (DAVIS JPEGImages/480p).

  True for a folder that holds no image file directly but at least one
  sub-folder that does; the CLI then predicts a video without `--video`.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(path) or _image_names(path):
    return False
  return any(_image_names(os.path.join(path, d)) for d in _subfolders(path))


def list_sequences(path: str) -> list[tuple[str, list[str]]]:
  """The sequences of a video input and their frames, in sorted order.

  Args:
    path: a folder of frames (one sequence, named after the folder) or a
      folder of such folders (one sequence per sub-folder that holds
      images; others are skipped).

  Returns:
    (sequence name, frame paths) pairs.

  Raises:
    FileNotFoundError: `path` is not a folder or holds no frames.
    ValueError: a sequence is named like an output folder (overlays,
      trajectories), which would mix results and visualisations.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"--input={path!r}: --video expects a folder of frames or a folder "
        "of sequence folders"
    )
  frames = _image_names(path)
  if frames:
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    sequences = [(name, [os.path.join(path, n) for n in frames])]
  else:
    sequences = []
    for sub in _subfolders(path):
      names = _image_names(os.path.join(path, sub))
      if names:
        sequences.append((sub, [os.path.join(path, sub, n) for n in names]))
  if not sequences:
    raise FileNotFoundError(
        f"--input={path!r}: no frames (extensions "
        f"{', '.join(IMAGE_EXTENSIONS)}) in the folder or its sub-folders"
    )
  for name, _ in sequences:
    if name in _VIDEO_EXTRAS:
      raise ValueError(
          f"--input={path!r}: sequence {name!r} would share its output "
          f"folder with the {name}/ visualisations; rename it"
      )
  return sequences


def load_metadata(config: ml_collections.ConfigDict) -> Any:
  """The class layout (`PanopticMetadata`) of the config's eval split.

  Raises:
    FileNotFoundError: the dataset cannot be read; the message names the
      config fields that locate it.
  """
  # Imported here: train pulls in TensorFlow (through clu's metric writers),
  # which the error paths of the CLI should not wait for.
  from pix2seq_d_jax import train

  inp = config.input
  try:
    meta = train.make_source(config, inp.eval_split).metadata
  except (OSError, ValueError) as e:
    raise FileNotFoundError(
        f"cannot read the class names of config.input.source="
        f"{inp.source!r} split config.input.eval_split={inp.eval_split!r} "
        f"from config.input.data_dir={inp.data_dir!r} ({e}); set "
        "--config.input.data_dir to the dataset the checkpoint was trained "
        "on"
    ) from e
  train.check_metadata(config, meta)
  return meta


def is_video_model(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's model conditions on earlier frames' masks."""
  return bool(config.input.get("proceeding_frames"))


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
  the key of frame 0 of `predict_video`'s sampler, so an image gets the
  masks a 1-frame sequence would get.

  Args:
    config: the config the checkpoint was trained with (overrides allowed).
    checkpoint: a workdir, its `checkpoints/` folder or a step folder.
    steps: sampling steps; None = `config.diffusion.sample_steps`.
    with_trajectory: also decode every step's x0 estimate.
    batch_size: images per jitted call; None = `config.evals.panoptic.
      batch_size` (else `config.input.batch_size`). A multiple of the
      data-parallel device count.
    metadata: the dataset's `PanopticMetadata`; None = `load_metadata`.

  Raises:
    ConfigError: invalid config, steps or batch size.
    FileNotFoundError: no checkpoint, or the dataset metadata is missing.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      checkpoint: str,
      *,
      steps: int | None = None,
      with_trajectory: bool = False,
      batch_size: int | None = None,
      metadata: Any = None,
  ):
    config_lib.validate(config)
    self.config = config
    self.video = is_video_model(config)
    self.steps = check_steps(
        "--steps", config.diffusion.sample_steps if steps is None else steps
    )
    self.with_trajectory = with_trajectory
    self.meta = load_metadata(config) if metadata is None else metadata
    panoptic_eval = config.evals.get("panoptic")
    self.min_pixels = (
        panoptic_eval.min_pixels if panoptic_eval is not None else 40
    )
    if batch_size is None:
      batch_size = _default_batch_size(config)
    self.mesh = sharding.make_mesh(config.mesh)
    dp = sharding.data_parallel_size(self.mesh)
    if batch_size < 1 or batch_size % dp:
      raise config_lib.ConfigError(
          f"--batch_size={batch_size}: expected a positive multiple of the "
          f"{dp} data-parallel devices"
      )
    self.batch_size = batch_size

    self.model = model = train_state.build_model(config)
    # The optimizer only shapes the abstract state the checkpoint restores
    # into; its state's structure does not depend on the schedule's length.
    tx, _ = train_state.make_optimizer(
        config.optax, total_steps=1, warmup_steps=0
    )
    init_fn = train_state.make_init_fn(
        model, tx, image_size=config.input.image_size,
        mask_size=config.input.mask_size,
        num_bits=2 * config.diffusion.bits_per_channel,
    )
    with jax.set_mesh(self.mesh):
      abstract_boxed = jax.eval_shape(init_fn, jax.random.key(0))
    self.shardings = shardings = sharding.state_shardings(
        abstract_boxed, self.mesh, config.sharding_rules
    )
    abstract = checkpointing.abstract_with_shardings(
        nn.unbox(abstract_boxed), shardings
    )
    state = checkpointing.restore_weights(checkpoint, abstract)
    self.params, self.batch_stats = state.ema_params, state.batch_stats
    del state  # The optimizer state and raw params are not needed.
    self._predict = self._make_predict_fn(model, shardings)
    self.rng = jax.random.key(config.seed)
    # Frame t of a sequence samples with key fold_in(rng, t)
    # (`train_state.make_video_predict_fn`); an image is frame 0.
    self._image_rng = (
        jax.random.fold_in(self.rng, 0) if self.video else self.rng
    )

  def _make_predict_fn(self, model: nn.Module, shardings: Any):
    d = self.config.diffusion
    num_classes = self.meta.num_classes
    max_instances = self.config.input.max_instances
    sample = train_state.make_predict_fn(
        model, d, num_classes=num_classes, max_instances=max_instances,
        num_steps=self.steps, return_trajectory=self.with_trajectory,
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

    batch = sharding.batch_sharding(self.mesh)
    return jax.jit(
        jax.vmap(one_image, in_axes=(None, None, 0, None)),
        in_shardings=(shardings.ema_params, shardings.batch_stats, batch,
                      sharding.replicated(self.mesh)),
        out_shardings=batch,
    )

  def preprocess(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Resizes (longer side = image_size) and pads one uint8 [h, w, 3] image.

    Returns:
      `preprocess.preprocess_eval`'s dict (image float32 [S, S, 3],
      orig_size and valid_size int32 [2], ...).
    """
    h, w = image.shape[:2]
    zeros = np.zeros((h, w), np.int32)
    raw = {"image": image, "semantic": zeros, "instance": zeros,
           "crowd": zeros.astype(bool), "image_id": 0}
    return preprocess.preprocess_eval(
        raw, image_size=self.config.input.image_size,
        mask_size=self.config.input.mask_size,
    )

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
      arrays = sharding.global_batch({"image": pixels}, self.mesh)
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
    stride = self.config.input.image_size / self.config.input.mask_size
    valid = [max(1, math.ceil(int(v) / stride)) for v in ex["valid_size"]]
    semantic, instance = (x[: valid[0], : valid[1]] for x in out[:2])
    ids, segments = postprocess.masks_to_panoptic(
        semantic, instance, is_thing=self.meta.is_thing,
        min_pixels=self.min_pixels,
    )
    ids = postprocess.resize_nearest(ids, [int(v) for v in ex["orig_size"]])
    trajectory = None
    if self.with_trajectory:
      trajectory = tuple(x[:, : valid[0], : valid[1]] for x in out[2:])
    return Prediction(
        segment_ids=ids.astype(np.int32),
        segments_info=postprocess.recount_segments(
            ids, segments, self.meta.class_to_category_id),
        semantic=semantic,
        instance=instance,
        trajectory=trajectory,
    )


def _default_batch_size(config: ml_collections.ConfigDict) -> int:
  panoptic_eval = config.evals.get("panoptic")
  if panoptic_eval is not None:
    return panoptic_eval.batch_size
  return config.input.batch_size


def output_names(paths: Sequence[str]) -> list[str]:
  """File stems, made unique (`a.jpg` and `a.png` give `a` and `a_1`)."""
  names, seen = [], set()
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = stem, 0
    while name in seen:
      k += 1
      name = f"{stem}_{k}"
    seen.add(name)
    names.append(name)
  return names


def write_visuals(
    output: str, name: str, image: np.ndarray, pred: Prediction, meta: Any,
    names: dict[int, str],
) -> None:
  """Writes overlays/<name>.png (and trajectories/<name>.png/.gif).

  `names` maps dataset category ids to the class names drawn on segments.
  """
  visualize.save_png(
      os.path.join(output, "overlays", f"{name}.png"),
      visualize.overlay(image, pred.segment_ids, pred.segments_info, names),
  )
  if pred.trajectory is not None:
    frames = visualize.colorize_pairs(*pred.trajectory, meta.is_thing)
    visualize.save_trajectory(
        frames, os.path.join(output, "trajectories", f"{name}.png"),
        os.path.join(output, "trajectories", f"{name}.gif"),
    )


def write_predictions(
    predictor: Predictor, paths: Sequence[str], output: str
) -> dict[str, Any]:
  """Predicts image files and writes PNGs, JSON, overlays (and trajectories).

  Images are read one batch at a time, so folders of any length fit in
  memory.

  Args:
    predictor: the restored model.
    paths: image files.
    output: output folder (created).

  Returns:
    The written `panoptic.json` content.
  """
  meta = predictor.meta
  names = {int(c["id"]): str(c["name"]) for c in meta.categories}
  images, annotations = [], []
  out_names = output_names(paths)
  items = list(zip(paths, out_names, strict=True))
  for start in range(0, len(items), predictor.batch_size):
    chunk = items[start : start + predictor.batch_size]
    pixels = [panoptic_format.read_rgb_image(p) for p, _ in chunk]
    for (path, name), image, pred in zip(
        chunk, pixels, predictor.predict(pixels), strict=True
    ):
      image_id = len(images) + 1
      h, w = image.shape[:2]
      png_name = f"{name}.png"
      panoptic_format.write_panoptic_png(
          os.path.join(output, "panoptic", png_name), pred.segment_ids
      )
      write_visuals(output, name, image, pred, meta, names)
      images.append({"id": image_id, "file_name": os.path.basename(path),
                     "height": h, "width": w})
      segments = [{k: v for k, v in s.items() if k != "isthing"}
                  for s in pred.segments_info]
      annotations.append({"image_id": image_id, "file_name": png_name,
                          "segments_info": segments})
  categories = list(meta.categories)
  panoptic_format.write_panoptic_json(
      os.path.join(output, "panoptic.json"), images, annotations, categories
  )
  logging.info("Wrote %d predictions to %s.", len(images), output)
  return {"images": images, "annotations": annotations,
          "categories": categories}


def write_video_predictions(
    predictor: Predictor,
    sequences: Sequence[tuple[str, Sequence[str]]],
    output: str,
) -> dict[str, list[str]]:
  """Predicts video frames and writes DAVIS palette PNGs and overlays.

  Frames are predicted independently (an image model), batched across
  sequences and read one batch at a time. Frame-conditioned models use
  `predict_video.write_clip_predictions` instead.

  Args:
    predictor: the restored model.
    sequences: (sequence name, frame paths) pairs, e.g. `list_sequences`.
    output: results folder (created): `<seq>/<frame>.png` object ids,
      `overlays/<seq>/<frame>.png`, with a trajectory predictor also
      `trajectories/<seq>/<frame>.png` and `.gif`.

  Returns:
    Sequence name -> the PNG names written in `<output>/<seq>/`, in order.
  """
  meta = predictor.meta
  names = {int(c["id"]): str(c["name"]) for c in meta.categories}
  items = [
      (seq, path, name)
      for seq, paths in sequences
      for path, name in zip(paths, output_names(paths), strict=True)
  ]
  written: dict[str, list[str]] = {seq: [] for seq, _ in sequences}
  for start in range(0, len(items), predictor.batch_size):
    chunk = items[start : start + predictor.batch_size]
    pixels = [panoptic_format.read_rgb_image(p) for _, p, _ in chunk]
    for (seq, _, name), image, pred in zip(
        chunk, pixels, predictor.predict(pixels), strict=True
    ):
      png_name = f"{name}.png"
      davis_eval.write_palette_png(os.path.join(output, seq, png_name),
                                   pred.object_ids())
      write_visuals(output, os.path.join(seq, name), image, pred, meta,
                    names)
      written[seq].append(png_name)
  logging.info("Wrote %d frames of %d sequences to %s.", len(items),
               len(written), output)
  return written


def _batch_size_for(
    config: ml_collections.ConfigDict, num_images: int
) -> int:
  # No padding beyond one image per data-parallel device for few inputs.
  dp = sharding.data_parallel_size(sharding.make_mesh(config.mesh))
  return min(_default_batch_size(config), -(-num_images // dp) * dp)


def predict_images(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    inputs: str | Sequence[str],
    output: str,
    steps: int | None = None,
    save_trajectory: bool = False,
    *,
    batch_size: int | None = None,
) -> dict[str, Any]:
  """Restores a checkpoint and segments image files (what the CLI runs).

  A frame-conditioned (video) config segments each image as a 1-frame
  sequence (see `Predictor`).

  Args:
    config: the training config.
    checkpoint: a workdir, its `checkpoints/` folder or a step folder.
    inputs: an image file, a folder of images, or a sequence of those.
    output: output folder.
    steps: sampling steps; None = `config.diffusion.sample_steps`.
    save_trajectory: also write every step's decoded mask.
    batch_size: images per jitted call; None = the eval batch size, capped
      at the number of images (rounded up to the data-parallel devices).

  Returns:
    The written `panoptic.json` content.

  Raises:
    ConfigError, FileNotFoundError, ValueError: bad config, paths or files.
  """
  paths = list_images(inputs)
  if batch_size is None:
    batch_size = _batch_size_for(config, len(paths))
  predictor = Predictor(config, checkpoint, steps=steps,
                        with_trajectory=save_trajectory,
                        batch_size=batch_size)
  return write_predictions(predictor, paths, output)


def predict_videos(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    inputs: str,
    output: str,
    steps: int | None = None,
    save_trajectory: bool = False,
    *,
    batch_size: int | None = None,
    steps_later: int | None = None,
    length_bucket: int = DEFAULT_LENGTH_BUCKET,
) -> dict[str, list[str]]:
  """Restores a checkpoint and segments video frames (the CLI's video mode).

  Image models segment every frame independently; frame-conditioned models
  (`config.input.proceeding_frames`) segment whole sequences with
  `predict_video.predict_sequences`, so instance ids carry across frames.

  Args:
    config: the training config.
    checkpoint: a workdir, its `checkpoints/` folder or a step folder.
    inputs: a folder of frames or a folder of sequence folders.
    output: results folder (DAVIS format, see the module docstring).
    steps: sampling steps (of the first frame for a video model); None =
      `config.diffusion.sample_steps`.
    save_trajectory: also write every step's decoded mask (image models).
    batch_size: frames (image model) or sequences (video model) per jitted
      call; None as for `predict_images` (image model) or
      `predict_video.default_batch_size`.
    steps_later: video models: sampling steps of the later frames; None =
      `config.diffusion.sample_steps_later`.
    length_bucket: video models: sequences are padded to a multiple of this
      many frames, so one compiled program serves every length in a bucket.

  Returns:
    Sequence name -> the PNG names written in `<output>/<seq>/`.

  Raises:
    ConfigError: a bad value, or an option the model does not support.
    FileNotFoundError, ValueError: bad paths or files.
  """
  sequences = list_sequences(inputs)
  if is_video_model(config):
    if save_trajectory:
      raise config_lib.ConfigError(
          "--save_trajectory: the sequence sampler of frame-conditioned "
          "models (config.input.proceeding_frames="
          f"{tuple(config.input.proceeding_frames)}) records no trajectory; "
          "predict single images to see one"
      )
    # Imported here: predict_video builds on this module.
    from pix2seq_d_jax import predict_video

    return predict_video.predict_sequences(
        config, checkpoint, sequences, output, steps=steps,
        steps_later=steps_later, batch_size=batch_size,
        length_bucket=length_bucket,
    )
  if steps_later is not None:
    raise config_lib.ConfigError(
        f"--steps_later={steps_later}: only frame-conditioned models "
        "(config.input.proceeding_frames non-empty) sample later frames "
        "differently"
    )
  if batch_size is None:
    batch_size = _batch_size_for(
        config, sum(len(frames) for _, frames in sequences)
    )
  predictor = Predictor(config, checkpoint, steps=steps,
                        with_trajectory=save_trajectory,
                        batch_size=batch_size)
  return write_video_predictions(predictor, sequences, output)


# ------------------------------------------------------------------- CLI


def _define_flags() -> dict[str, Any]:
  """Defines the CLI's flags; called only when run as a program.

  Importing this module (tests, notebooks, other CLIs that define --config)
  then adds nothing to absl's global FLAGS.
  """
  return dict(
      config=config_flags.DEFINE_config_file(
          "config", None, "Config file (path[:args]) the checkpoint was "
          "trained with.", lock_config=True,
      ),
      checkpoint=flags.DEFINE_string(
          "checkpoint", None,
          "Workdir, its checkpoints/ folder or a step folder.",
      ),
      input=flags.DEFINE_string(
          "input", None,
          "Image file, folder of images, or video (see --video).",
      ),
      video=flags.DEFINE_bool(
          "video", False,
          "--input is a video: a folder of frames (one sequence) or a folder "
          "of sequence folders; writes DAVIS palette PNGs. A folder that "
          "holds only sequence folders is a video even without this flag.",
      ),
      output=flags.DEFINE_string("output", None, "Output folder."),
      steps=flags.DEFINE_integer(
          "steps", None,
          "Sampling steps (default: config.diffusion.sample_steps).",
          lower_bound=1,
      ),
      save_trajectory=flags.DEFINE_bool(
          "save_trajectory", False,
          "Also write every sampling step's mask (PNG strip and GIF).",
      ),
      batch_size=flags.DEFINE_integer(
          "batch_size", None,
          "Images per batch (default: the eval batch size); sequences per "
          "batch for video models (default: the davis_video eval's, else "
          "one per device).", lower_bound=1,
      ),
      steps_later=flags.DEFINE_integer(
          "steps_later", None,
          "Video models: sampling steps of every frame after the first "
          "(default: config.diffusion.sample_steps_later).", lower_bound=1,
      ),
      length_bucket=flags.DEFINE_integer(
          "length_bucket", DEFAULT_LENGTH_BUCKET,
          "Video models: sequences are padded to a multiple of this many "
          "frames (the last frame repeated, then dropped), so one compiled "
          "program serves every length in a bucket.", lower_bound=1,
      ),
  )


def _main(argv: Sequence[str], cli: dict[str, Any]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  output, inputs = cli["output"].value, cli["input"].value
  video = cli["video"].value or is_sequence_root(inputs)
  args = (cli["config"].value, cli["checkpoint"].value, inputs, output,
          cli["steps"].value, cli["save_trajectory"].value)
  try:
    if video:
      result = predict_videos(
          *args, batch_size=cli["batch_size"].value,
          steps_later=cli["steps_later"].value,
          length_bucket=cli["length_bucket"].value,
      )
    else:
      if cli["steps_later"].value is not None:
        raise config_lib.ConfigError(
            "--steps_later: applies to video inputs (--video) only"
        )
      result = predict_images(*args, batch_size=cli["batch_size"].value)
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    # One line, no traceback: these are the user's to fix.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if video:
    summary = {"sequences": len(result),
               "frames": sum(len(v) for v in result.values())}
  else:
    summary = {"images": len(result["images"]), "segments": sum(
        len(a["segments_info"]) for a in result["annotations"])}
  print(json.dumps({**summary, "output": os.path.abspath(output)}))


if __name__ == "__main__":
  _cli = _define_flags()
  flags.mark_flags_as_required(["config", "checkpoint", "input", "output"])
  app.run(
      functools.partial(_main, cli=_cli), flags_parser=config_lib.parse_flags
  )
