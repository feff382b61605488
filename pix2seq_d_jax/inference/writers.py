"""Writing predictions: COCO panoptic PNG + JSON, DAVIS palette PNGs, overlays.

Images give `panoptic.json` and `panoptic/<name>.png` (COCO panoptic, at
the input's original size) and `overlays/<name>.png`; videos give DAVIS
results, `<seq>/<frame>.png` palette PNGs of object ids, and
`overlays/<seq>/<frame>.png`. Inputs are read one batch at a time, so
folders of any length fit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from pix2seq_d_jax.evaluators import visualize
from pix2seq_d_jax.formats import coco_panoptic as coco_format
from pix2seq_d_jax.formats import davis as davis_format
from pix2seq_d_jax.inference import inputs
from pix2seq_d_jax.inference import predictor as predictor_lib
from pix2seq_d_jax.inference import video_predictor as video_lib


def write_visuals(
    output: str, name: str, image: np.ndarray,
    pred: predictor_lib.Prediction, meta: Any, names: dict[int, str],
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
    predictor: predictor_lib.Predictor, paths: Sequence[str], output: str
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
  out_names = inputs.output_names(paths)
  items = list(zip(paths, out_names, strict=True))
  for start in range(0, len(items), predictor.batch_size):
    chunk = items[start : start + predictor.batch_size]
    pixels = [coco_format.read_rgb_image(p) for p, _ in chunk]
    for (path, name), image, pred in zip(
        chunk, pixels, predictor.predict(pixels), strict=True
    ):
      image_id = len(images) + 1
      h, w = image.shape[:2]
      png_name = f"{name}.png"
      coco_format.write_panoptic_png(
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
  coco_format.write_panoptic_json(
      os.path.join(output, "panoptic.json"), images, annotations, categories
  )
  logging.info("Wrote %d predictions to %s.", len(images), output)
  return {"images": images, "annotations": annotations,
          "categories": categories}


def write_video_predictions(
    predictor: predictor_lib.Predictor,
    sequences: Sequence[tuple[str, Sequence[str]]],
    output: str,
) -> dict[str, list[str]]:
  """Predicts video frames and writes DAVIS palette PNGs and overlays.

  Frames are predicted independently (an image model), batched across
  sequences and read one batch at a time. Frame-conditioned models use
  `write_clip_predictions` instead.

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
      for path, name in zip(paths, inputs.output_names(paths), strict=True)
  ]
  written: dict[str, list[str]] = {seq: [] for seq, _ in sequences}
  for start in range(0, len(items), predictor.batch_size):
    chunk = items[start : start + predictor.batch_size]
    pixels = [coco_format.read_rgb_image(p) for _, p, _ in chunk]
    for (seq, _, name), image, pred in zip(
        chunk, pixels, predictor.predict(pixels), strict=True
    ):
      png_name = f"{name}.png"
      davis_format.write_palette_png(os.path.join(output, seq, png_name),
                                   pred.object_ids())
      write_visuals(output, os.path.join(seq, name), image, pred, meta,
                    names)
      written[seq].append(png_name)
  logging.info("Wrote %d frames of %d sequences to %s.", len(items),
               len(written), output)
  return written


def write_clip_predictions(
    predictor: video_lib.VideoPredictor,
    sequences: Sequence[tuple[str, Sequence[str]]],
    output: str,
) -> dict[str, list[str]]:
  """Predicts sequences and writes DAVIS palette PNGs and overlays.

  Sequences are read `predictor.batch_size` at a time.

  Args:
    predictor: the restored video model.
    sequences: (sequence name, frame paths) pairs, e.g.
      `inputs.list_sequences`.
    output: results folder (created): `<seq>/<frame>.png` object ids
      (`formats.davis.write_palette_png`) and `overlays/<seq>/<frame>.png`.

  Returns:
    Sequence name -> the PNG names written in `<output>/<seq>/`, in order.
  """
  meta = predictor.meta
  names = {int(c["id"]): str(c["name"]) for c in meta.categories}
  written: dict[str, list[str]] = {}
  for start in range(0, len(sequences), predictor.batch_size):
    chunk = sequences[start : start + predictor.batch_size]
    clips = [[coco_format.read_rgb_image(p) for p in paths]
             for _, paths in chunk]
    for (seq, paths), frames, pred in zip(
        chunk, clips, predictor.predict_clips(clips), strict=True
    ):
      stems = inputs.output_names(paths)
      for stem, image, ids, frame in zip(
          stems, frames, pred.object_ids, pred.frames, strict=True
      ):
        davis_format.write_palette_png(
            os.path.join(output, seq, f"{stem}.png"), ids)
        write_visuals(output, os.path.join(seq, stem), image, frame,
                              meta, names)
      written[seq] = [f"{stem}.png" for stem in stems]
  logging.info("Wrote %d frames of %d sequences to %s.",
               sum(len(v) for v in written.values()), len(written), output)
  return written
