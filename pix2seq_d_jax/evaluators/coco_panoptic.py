"""Panoptic quality of sampled masks on a COCO-panoptic-layout split.

For every eval image: sample (semantic, instance) at mask resolution with the
EMA weights, crop the padding, post-process into panoptic segments (majority
vote, min-area filter, one segment per stuff class), resize to the original
image size (nearest), then score against the ground-truth PNG with the
panopticapi-exact per-image matcher. Counts are summed over images (and over
processes), so the result equals `pq_compute` on the written files. The
predictions are also written in the COCO panoptic format (PNG + JSON) and the
first images as overlay PNGs (image | ground truth | prediction).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from pix2seq_d_jax import sharding
from pix2seq_d_jax.data import pipeline, preprocess
from pix2seq_d_jax.evaluation import panoptic
from pix2seq_d_jax.evaluators import base, postprocess, register, visualize
from pix2seq_d_jax.formats import atomic
from pix2seq_d_jax.formats import coco_panoptic as coco_format


@register("coco_panoptic")
class CocoPanopticEvaluator(base.Evaluator):
  """PQ / SQ / RQ for all, things and stuff, plus written predictions."""

  def __init__(self, **kwargs: Any):
    """See `base.Evaluator`; the source must have a panoptic JSON."""
    super().__init__(**kwargs)
    meta = self.source.metadata
    self.meta = meta
    self.gt = coco_format.load_panoptic_json(meta.gt_json)
    self.gt_by_id = {a["image_id"]: a for a in self.gt["annotations"]}
    self.images_by_id = {im["id"]: im for im in self.gt["images"]}
    self.categories = {c["id"]: c for c in self.gt["categories"]}

  def _batches(self):
    local = self.config.batch_size // jax.process_count()
    return pipeline.make_eval_batches(
        self.source,
        batch_size=local,
        preprocess_fn=self.preprocess_fn,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        max_examples=self.config.max_examples,
    )

  def run(self, params: Any, batch_stats: Any, *, step: int) -> dict:
    """Samples every eval image and returns the panoptic metrics."""
    out_name = f"{self.name}_step{step}"
    out_dir = os.path.join(self.workdir, "predictions", out_name)
    png_dir = os.path.join(out_dir, "panoptic")
    overlay_dir = os.path.join(self.workdir, "overlays", out_name)
    os.makedirs(png_dir, exist_ok=True)
    os.makedirs(overlay_dir, exist_ok=True)
    stat = panoptic.PQStat()
    annotations = []
    rng = jax.random.key(self.seed)
    num_overlays = self.config.num_overlays
    for i, batch in enumerate(self._batches()):
      mask = np.asarray(batch.pop("_mask"), bool)
      host = {k: np.asarray(v) for k, v in batch.items()}
      arrays = sharding.global_batch({"image": host["image"]}, self.mesh)
      semantic, instance = self.predict_fn(
          params, batch_stats, arrays["image"], jax.random.fold_in(rng, i)
      )
      semantic, instance = base.local_rows(semantic), base.local_rows(instance)
      for j in np.flatnonzero(mask):
        ann, ids, segments = self._score_one(
            semantic[j], instance[j], host, j, png_dir, stat
        )
        annotations.append(ann)
        if jax.process_index() == 0 and len(annotations) <= num_overlays:
          self._write_overlay(ann["image_id"], ids, segments, overlay_dir)
    stat, num_images = self._sum_over_processes(stat, len(annotations))
    results = panoptic.summarize(stat, self.categories)
    if jax.process_index() == 0:
      self._write_json(out_dir, annotations, results)
    metrics = {}
    for group, key in (("All", ""), ("Things", "_things"),
                       ("Stuff", "_stuff")):
      for m in ("pq", "sq", "rq"):
        metrics[f"{m}{key}"] = results[group][m]
    metrics["num_images"] = num_images
    logging.info("eval/%s at step %d: %s", self.name, step, metrics)
    return metrics

  def _score_one(self, semantic, instance, host, j, png_dir, stat):
    image_id = int(host["image_id"][j])
    orig_h, orig_w = (int(v) for v in host["orig_size"][j])
    valid_h, valid_w = (int(v) for v in host["valid_size"][j])
    valid = postprocess.valid_mask_size(
        (valid_h, valid_w), host["image"].shape[1], semantic.shape[0])
    ids, segments = postprocess.masks_to_panoptic(
        semantic[: valid[0], : valid[1]],
        instance[: valid[0], : valid[1]],
        is_thing=self.meta.is_thing,
        min_pixels=self.config.min_pixels,
    )
    ids = preprocess.resize_labels(ids, (orig_h, orig_w))
    segments = [
        {k: v for k, v in seg.items() if k != "isthing"}
        for seg in postprocess.recount_segments(
            ids, segments, self.meta.class_to_category_id)
    ]
    gt_ann = self.gt_by_id[image_id]
    png_name = gt_ann["file_name"]
    coco_format.write_panoptic_png(os.path.join(png_dir, png_name), ids)
    gt_ids = coco_format.read_panoptic_png(
        os.path.join(self.meta.gt_folder, png_name)
    )
    stat += panoptic.pq_single_image(
        gt_ids, gt_ann["segments_info"], ids, segments, self.categories
    )
    ann = {"image_id": image_id, "file_name": png_name,
           "segments_info": segments}
    return ann, ids, segments

  def _write_overlay(self, image_id, ids, segments, overlay_dir):
    info = self.images_by_id[image_id]
    image = coco_format.read_rgb_image(
        os.path.join(self.meta.image_folder, info["file_name"]))
    gt_ann = self.gt_by_id[image_id]
    gt_ids = coco_format.read_panoptic_png(
        os.path.join(self.meta.gt_folder, gt_ann["file_name"])
    )
    # Stuff takes its class's colour in both panels, so they compare.
    def with_isthing(segs):
      return [dict(seg, isthing=bool(
          self.categories[seg["category_id"]]["isthing"])) for seg in segs]

    gt_rgb = visualize.colorize(gt_ids, with_isthing(gt_ann["segments_info"]))
    pred_rgb = visualize.colorize(ids, with_isthing(segments))
    strip = visualize.overlay_strip(image, gt_rgb, pred_rgb)
    visualize.save_png(os.path.join(overlay_dir, f"{image_id}.png"), strip)

  def _sum_over_processes(self, stat, num_images):
    """Sums the exact per-category counts of every process."""
    if jax.process_count() == 1:
      return stat, num_images
    cat_ids = sorted(self.categories)
    local = np.concatenate(
        [stat.to_array(cat_ids).ravel(), [float(num_images)]]
    )
    total = np.asarray(multihost_utils.process_allgather(local)).sum(0)
    out = panoptic.PQStat.from_array(
        cat_ids, total[:-1].reshape(len(cat_ids), -1)
    )
    return out, int(total[-1])

  def _write_json(self, out_dir, annotations, results):
    path = os.path.join(out_dir, "panoptic.json")
    coco_format.write_panoptic_json(
        path, [self.images_by_id[a["image_id"]] for a in annotations],
        annotations, self.gt["categories"]
    )
    atomic.write_json(
        os.path.join(out_dir, "metrics.json"), results, indent=2)
