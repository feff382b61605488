"""Panoptic quality of sampled masks on a COCO-panoptic-layout split.

For every eval image: sample (semantic, instance) at mask resolution with the
EMA weights, bring both maps to the original image size as the reference
does (upsample to the padded input, crop the content, resize; nearest), build
panoptic segments there (majority vote per `stuff_identity`, the min-area
filter in original pixels), then score against the ground-truth PNG with the
panopticapi-exact per-image matcher (its crowd rule by default; the
config field `crowd='merge'` selects the deviation of `evaluation.panoptic`).
Each process scores its rows of every
global batch and writes their PNGs; the per-image segments and counts are
gathered to every process and summed in image order, so PQ, `panoptic.json`
(written by process 0, each image once) and the PNGs equal a 1-process run's
and `pq_compute` on the written files. The first `num_overlays` images are
also written as overlay PNGs (image | ground truth | prediction). With a
skipping source, bad examples are left out of both predictions and ground
truth, counted (`skipped_examples`) and named in `metrics.json`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from pix2seq_d_jax import config_lib, sharding
from pix2seq_d_jax.data import pipeline
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
    crowd = self.config.get("crowd", "last")
    if crowd not in panoptic.CROWD_RULES:
      raise ValueError(
          f"config.evals.{self.name}.crowd={crowd!r}: expected one of "
          f"{panoptic.CROWD_RULES}")
    self.merge_crowd = crowd == "merge"
    # Shared with config.input.stuff_identity in configs/common.py.
    self.stuff_identity = self.config.get(
        "stuff_identity", config_lib.STUFF_IDENTITY_DEFAULT)
    if self.stuff_identity not in config_lib.STUFF_IDENTITIES:
      raise ValueError(
          f"config.evals.{self.name}.stuff_identity={self.stuff_identity!r}: "
          f"expected one of {list(config_lib.STUFF_IDENTITIES)}")

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
    workdir = epath.Path(self.workdir)
    out_dir = workdir / "predictions" / out_name
    png_dir = out_dir / "panoptic"
    overlay_dir = workdir / "overlays" / out_name
    png_dir.mkdir(parents=True, exist_ok=True)
    overlay_dir.mkdir(parents=True, exist_ok=True)
    records = []
    rng = jax.random.key(self.seed)
    for i, batch in enumerate(self._batches()):
      mask = np.asarray(batch.pop("_mask"), bool)
      skipped = np.asarray(batch.pop("_skipped"), bool)
      index = np.asarray(batch.pop("_index"))
      host = {k: np.asarray(v) for k, v in batch.items()}
      arrays = sharding.global_batch(
          {"image": host["image"]}, self.mesh, self.rules)
      semantic, instance = self.predict_fn(
          params, batch_stats, arrays["image"], jax.random.fold_in(rng, i)
      )
      semantic, instance = base.local_rows(semantic), base.local_rows(instance)
      records.extend({"index": int(index[j]), "skipped": True}
                     for j in np.flatnonzero(skipped))
      for j in np.flatnonzero(mask):
        ann, ids, segments, stat = self._score_one(
            semantic[j], instance[j], host, j, png_dir)
        records.append({"index": int(index[j]), "annotation": ann,
                        "stat": _stat_to_json(stat)})
        # By example index, not by count: the same images in any process.
        if index[j] < self.config.num_overlays:
          self._write_overlay(ann["image_id"], ids, segments, overlay_dir)
    records = base.gather_records(records)
    annotations = [r["annotation"] for r in records if "annotation" in r]
    skipped = [self._describe(r["index"]) for r in records if "skipped" in r]
    # Summed in image order, as one process would: the float sums match.
    stat = panoptic.PQStat()
    for r in records:
      if "stat" in r:
        stat += _stat_from_json(r["stat"])
    results = panoptic.summarize(stat, self.categories)
    results["num_images"] = len(annotations)
    results["skipped_examples"] = skipped
    if jax.process_index() == 0:
      self._write_json(out_dir, annotations, results)
    metrics = {}
    for group, key in (("All", ""), ("Things", "_things"),
                       ("Stuff", "_stuff")):
      for m in ("pq", "sq", "rq"):
        metrics[f"{m}{key}"] = results[group][m]
    metrics["num_images"] = len(annotations)
    if getattr(self.source, "skip_bad_examples", False):
      metrics["skipped_examples"] = len(skipped)
    if skipped:
      logging.warning("eval/%s: %d bad examples left out: %s", self.name,
                      len(skipped), skipped)
    # The reporter logs one formatted line per evaluation; this is detail.
    logging.debug("eval/%s at step %d: %s", self.name, step, metrics)
    return metrics

  def _describe(self, index: int) -> dict[str, Any]:
    """Names a skipped example: its index and, if known, id and file."""
    out: dict[str, Any] = {"index": index}
    image_ids = getattr(self.source, "image_ids", None)
    if image_ids is not None:
      image_id = int(image_ids()[index])
      out["image_id"] = image_id
      if image_id in self.images_by_id:
        out["file_name"] = self.images_by_id[image_id]["file_name"]
    return out

  def _score_one(self, semantic, instance, host, j, png_dir):
    image_id = int(host["image_id"][j])
    orig_h, orig_w = (int(v) for v in host["orig_size"][j])
    valid_h, valid_w = (int(v) for v in host["valid_size"][j])
    # Resized to the image first, then segments and the size rule there.
    ids, segments = postprocess.panoptic_at_original(
        semantic, instance, valid_size=(valid_h, valid_w),
        image_size=host["image"].shape[1:3], orig_size=(orig_h, orig_w),
        is_thing=self.meta.is_thing, min_pixels=self.config.min_pixels,
        stuff_identity=self.stuff_identity,
    )
    segments = [
        {k: v for k, v in seg.items() if k != "isthing"}
        for seg in postprocess.recount_segments(
            ids, segments, self.meta.class_to_category_id)
    ]
    gt_ann = self.gt_by_id[image_id]
    png_name = gt_ann["file_name"]
    coco_format.write_panoptic_png(png_dir / png_name, ids)
    gt_ids = coco_format.read_panoptic_png(
        epath.Path(self.meta.gt_folder) / png_name
    )
    stat = panoptic.pq_single_image(
        gt_ids, gt_ann["segments_info"], ids, segments, self.categories,
        merge_crowd=self.merge_crowd,
    )
    ann = {"image_id": image_id, "file_name": png_name,
           "segments_info": segments}
    return ann, ids, segments, stat

  def _write_overlay(self, image_id, ids, segments, overlay_dir):
    info = self.images_by_id[image_id]
    image = coco_format.read_rgb_image(
        epath.Path(self.meta.image_folder) / info["file_name"])
    gt_ann = self.gt_by_id[image_id]
    gt_ids = coco_format.read_panoptic_png(
        epath.Path(self.meta.gt_folder) / gt_ann["file_name"]
    )
    # Stuff takes its class's colour in both panels, so they compare.
    def with_isthing(segs):
      return [dict(seg, isthing=bool(
          self.categories[seg["category_id"]]["isthing"])) for seg in segs]

    gt_rgb = visualize.colorize(gt_ids, with_isthing(gt_ann["segments_info"]))
    pred_rgb = visualize.colorize(ids, with_isthing(segments))
    strip = visualize.overlay_strip(image, gt_rgb, pred_rgb)
    visualize.save_png(overlay_dir / f"{image_id}.png", strip)

  def _write_json(self, out_dir, annotations, results):
    coco_format.write_panoptic_json(
        out_dir / "panoptic.json",
        [self.images_by_id[a["image_id"]] for a in annotations],
        annotations, self.gt["categories"]
    )
    atomic.write_json(out_dir / "metrics.json", results, indent=2)


def _stat_to_json(stat: panoptic.PQStat) -> dict[str, list]:
  """One image's counts as {category id: [iou, tp, fp, fn]}."""
  return {str(c): [float(s.iou), int(s.tp), int(s.fp), int(s.fn)]
          for c, s in stat.pq_per_cat.items()}


def _stat_from_json(rows: dict[str, list]) -> panoptic.PQStat:
  """Inverse of `_stat_to_json`."""
  stat = panoptic.PQStat()
  for c, (iou, tp, fp, fn) in rows.items():
    stat.pq_per_cat[int(c)] += panoptic.PQStatCat(iou=iou, tp=tp, fp=fp, fn=fn)
  return stat
