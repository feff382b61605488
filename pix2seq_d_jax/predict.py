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
segment each sequence as a whole (`inference.video_predictor`): the first
frame with `--steps`, every later one with `--steps_later` conditioned on
the masks the model predicted for the frames before it, so an object keeps
its id through the sequence. The PNG values are then the ids the
in-training DAVIS J&F evaluator scores (`evaluators.davis_video.
result_ids`: objects renumbered 1..k by first appearance, at most the 20
largest). The frames of a sequence must share one size; sequences are
padded to a multiple of `--length_bucket` frames (the last frame repeated,
its masks dropped), so one compiled program serves every length in a
bucket without changing any result, and `--batch_size` counts sequences.
A single image given to a video model is a 1-frame sequence: it is
conditioned on empty masks of the
earlier frames, as a sequence's first frame is.

Every image (every sequence) is sampled from the same starting noise
(`config.seed`) and the batch is vmapped per image (sequence), so a
prediction does not depend on the other inputs, their order or the batch
size. Errors of the user's making print one `error: ...` line and exit
with status 2.

The work is done by `inference/` (predictors, input discovery, writers);
this module is the command line and the two functions it calls,
`predict_images` and `predict_videos`, both built from
`experiment.create`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from pix2seq_d_jax import (
    config_lib,
    experiment,
    reporting,
    sharding,
    xla_env,
)
from pix2seq_d_jax.formats import paths as path_lib
from pix2seq_d_jax.inference import inputs, writers
from pix2seq_d_jax.inference import predictor as predictor_lib
from pix2seq_d_jax.inference import video_predictor as video_lib

DEFAULT_LENGTH_BUCKET = video_lib.DEFAULT_LENGTH_BUCKET


def load_predictor(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    *,
    steps: int | None = None,
    with_trajectory: bool = False,
    batch_size: int | None = None,
    metadata: Any = None,
) -> predictor_lib.Predictor:
  """Restores a checkpoint's inference weights into an image `Predictor`.

  Args:
    config: the config the checkpoint was trained with (overrides allowed).
    checkpoint: a workdir, its `checkpoints/` folder or a step folder.
    steps: sampling steps; None = `config.diffusion.sample_steps`.
    with_trajectory: also decode every step's x0 estimate.
    batch_size: images per jitted call (see `Predictor`).
    metadata: the dataset's `PanopticMetadata`; None = read from the
      config's eval split.

  Raises:
    ConfigError: invalid config, steps or batch size.
    FileNotFoundError: no checkpoint, or the dataset metadata is missing.
  """
  exp = experiment.create(config)
  meta = exp.eval_metadata() if metadata is None else metadata
  return predictor_lib.Predictor(
      exp, exp.restore_inference_weights(checkpoint), meta, steps=steps,
      with_trajectory=with_trajectory, batch_size=batch_size)


def load_video_predictor(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    *,
    steps: int | None = None,
    steps_later: int | None = None,
    batch_size: int | None = None,
    length_bucket: int = DEFAULT_LENGTH_BUCKET,
    metadata: Any = None,
) -> video_lib.VideoPredictor:
  """Restores a frame-conditioned model into a `VideoPredictor`.

  Arguments as `load_predictor`, plus `steps_later` (sampling steps of
  every later frame) and `length_bucket` (sequences are padded to a
  multiple of this many frames).
  """
  if not experiment.is_video(config):
    raise config_lib.ConfigError(
        "config.input.proceeding_frames=(): VideoPredictor needs a model "
        "conditioned on earlier frames; use load_predictor for image models"
    )
  video_lib.check_bucket(length_bucket)
  exp = experiment.create(config)
  meta = exp.eval_metadata() if metadata is None else metadata
  return video_lib.VideoPredictor(
      exp, exp.restore_inference_weights(checkpoint), meta, steps=steps,
      steps_later=steps_later, batch_size=batch_size,
      length_bucket=length_bucket)


def _batch_size_for(
    config: ml_collections.ConfigDict, num_images: int
) -> int:
  # No padding beyond one image per data-parallel device for few inputs.
  dp = sharding.data_parallel_size(sharding.make_mesh(config.mesh),
                                   config.sharding_rules)
  return min(predictor_lib.default_batch_size(config),
             -(-num_images // dp) * dp)


def predict_images(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    images: str | Sequence[str],
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
    images: an image file, a folder of images, or a sequence of those.
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
  paths = inputs.list_images(images)
  if batch_size is None:
    batch_size = _batch_size_for(config, len(paths))
  predictor = load_predictor(config, checkpoint, steps=steps,
                             with_trajectory=save_trajectory,
                             batch_size=batch_size)
  return writers.write_predictions(predictor, paths, output)


def predict_videos(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    video: str,
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
  `load_video_predictor`, so instance ids carry across frames.

  Args:
    config: the training config.
    checkpoint: a workdir, its `checkpoints/` folder or a step folder.
    video: a folder of frames or a folder of sequence folders.
    output: results folder (DAVIS format, see the module docstring).
    steps: sampling steps (of the first frame for a video model); None =
      `config.diffusion.sample_steps`.
    save_trajectory: also write every step's decoded mask (image models).
    batch_size: frames (image model) or sequences (video model) per jitted
      call; None as for `predict_images` (image model) or
      `video_predictor.default_batch_size`.
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
  sequences = inputs.list_sequences(video)
  if experiment.is_video(config):
    if save_trajectory:
      raise config_lib.ConfigError(
          "--save_trajectory: the sequence sampler of frame-conditioned "
          "models (config.input.proceeding_frames="
          f"{tuple(config.input.proceeding_frames)}) records no trajectory; "
          "predict single images to see one"
      )
    video_lib.check_bucket(length_bucket)
    video_lib.check_frame_sizes(sequences)
    if batch_size is None:
      batch_size = video_lib.default_batch_size(config, len(sequences))
    predictor = load_video_predictor(
        config, checkpoint, steps=steps, steps_later=steps_later,
        batch_size=batch_size, length_bucket=length_bucket)
    return writers.write_clip_predictions(predictor, sequences, output)
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
  predictor = load_predictor(config, checkpoint, steps=steps,
                             with_trajectory=save_trajectory,
                             batch_size=batch_size)
  return writers.write_video_predictions(predictor, sequences, output)


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
  reporting.configure_terminal(flags.FLAGS.verbosity)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  output, source = cli["output"].value, cli["input"].value
  video = cli["video"].value or inputs.is_sequence_root(source)
  args = (cli["config"].value, cli["checkpoint"].value, source, output,
          cli["steps"].value, cli["save_trajectory"].value)
  try:
    # Before the first device use (XLA reads its flags once), as `main`.
    xla_env.set_xla_flags(cli["config"].value)
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
  print(json.dumps({**summary, "output": path_lib.absolute(output)}))


if __name__ == "__main__":
  _cli = _define_flags()
  flags.mark_flags_as_required(["config", "checkpoint", "input", "output"])
  app.run(
      functools.partial(_main, cli=_cli), flags_parser=config_lib.parse_flags
  )
