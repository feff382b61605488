"""The in-training panoptic evaluator, driven by oracle predictors.

A predictor that returns the ground truth must score PQ = 1 through the
whole evaluator path (eval preprocessing, padding and masking of batches,
post-processing, resizing back, matching); the files it writes must score
the same through the offline `pq_compute`. A bad example skipped by the
source is left out of predictions and ground truth alike, and named.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from pix2seq_d_jax import sharding
from pix2seq_d_jax.data import coco_panoptic, preprocess, synthetic
from pix2seq_d_jax.evaluation import panoptic
from pix2seq_d_jax.evaluators import coco_panoptic as evaluator_lib

SIZE = 64


@pytest.fixture(scope="module")
def val_source(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth") / "ds")
  synthetic.generate(root, num_train=2, num_val=5, image_size=SIZE, seed=3)
  return coco_panoptic.CocoPanopticSource(root, "val")


def _oracle(source, transform=None, size=SIZE):
  """A predict_fn that looks the GT up by the image's pixel sum."""
  table = {}
  for i in range(len(source)):
    ex = preprocess.preprocess_eval(source[i], image_size=size,
                                    mask_size=size)
    key = round(float(ex["image"].sum()), 2)
    sem, inst = ex["semantic"], ex["instance"]
    if transform is not None:
      sem, inst = transform(sem, inst)
    table[key] = (sem, inst)

  def predict(params, batch_stats, image, rng):
    del params, batch_stats, rng
    image = np.asarray(image)
    out = [table[round(float(im.sum()), 2)] for im in image]
    return (np.stack([o[0] for o in out]).astype(np.int32),
            np.stack([o[1] for o in out]).astype(np.int32))

  return predict


def _evaluator(source, predict, workdir, batch_size=2, size=SIZE,
               stuff_identity="zero"):
  config = ml_collections.ConfigDict(dict(
      type="coco_panoptic", batch_size=batch_size, max_examples=None,
      min_pixels=1, num_overlays=2, every_steps=None,
      stuff_identity=stuff_identity))
  return evaluator_lib.CocoPanopticEvaluator(
      name="panoptic", config=config, predict_fn=predict, source=source,
      preprocess_fn=lambda raw: preprocess.preprocess_eval(
          raw, image_size=size, mask_size=size),
      mesh=sharding.make_mesh([("data", 1)], jax.devices()[:1]), seed=0,
      workdir=workdir)


def test_oracle_with_random_stuff_identities_scores_one(val_source, tmp_path):
  # The 'random' target: every stuff segment its own id (here max id +
  # class); the per-identity vote gives back the ground truth.
  def number_stuff(sem, inst):
    return sem, preprocess.number_stuff_segments(
        sem, inst, np.zeros(sem.shape, bool))

  ev = _evaluator(val_source, _oracle(val_source, number_stuff),
                  str(tmp_path), stuff_identity="random")
  metrics = ev.run({}, {}, step=1)
  assert metrics["num_images"] == 5
  assert metrics["pq"] == pytest.approx(1.0)
  assert metrics["pq_stuff"] == pytest.approx(1.0)
  # The plain target (stuff id 0) read with the 'random' rules loses all
  # stuff: id 0 is void.
  plain = _evaluator(val_source, _oracle(val_source), str(tmp_path / "b"),
                     stuff_identity="random").run({}, {}, step=1)
  assert plain["pq_things"] == pytest.approx(1.0)
  assert plain["pq_stuff"] == 0.0


# A square input, and a (height, width) one: the 64x64 images in a 64x96
# input, padded on the right, are cropped back before scoring.
@pytest.mark.parametrize("size", [SIZE, (SIZE, 96)])
def test_oracle_scores_one_and_files_agree_with_pq_compute(val_source,
                                                           tmp_path, size):
  ev = _evaluator(val_source, _oracle(val_source, size=size), str(tmp_path),
                  size=size)
  metrics = ev.run({}, {}, step=7)
  # 5 images in batches of 2: the padded copy must not be counted.
  assert metrics["num_images"] == 5
  assert metrics["pq"] == pytest.approx(1.0)
  assert metrics["pq_things"] == pytest.approx(1.0)
  assert metrics["pq_stuff"] == pytest.approx(1.0)
  pred_dir = tmp_path / "predictions" / "panoptic_step7"
  offline = panoptic.pq_compute(
      val_source.metadata.gt_json, str(pred_dir / "panoptic.json"),
      gt_folder=val_source.metadata.gt_folder,
      pred_folder=str(pred_dir / "panoptic"))
  assert offline["All"]["pq"] == pytest.approx(metrics["pq"])
  with open(pred_dir / "metrics.json") as f:
    assert json.load(f)["All"]["n"] == offline["All"]["n"]
  assert len(os.listdir(tmp_path / "overlays" / "panoptic_step7")) == 2


def test_instance_ids_are_arbitrary_labels(val_source, tmp_path):
  def relabel(sem, inst):
    inst = np.where(inst > 0, 40 - inst, 0)  # A bijection on ids.
    return sem, inst

  ev = _evaluator(val_source, _oracle(val_source, relabel), str(tmp_path))
  assert ev.run({}, {}, step=1)["pq"] == pytest.approx(1.0)


def test_merged_instances_lose_things_not_stuff(val_source, tmp_path):
  def merge(sem, inst):
    return sem, np.where(inst > 0, 1, 0)  # Every thing is one instance.

  ev = _evaluator(val_source, _oracle(val_source, merge), str(tmp_path))
  metrics = ev.run({}, {}, step=1)
  assert metrics["pq_stuff"] == pytest.approx(1.0)
  assert metrics["pq_things"] < 0.9


def test_void_prediction_scores_zero(val_source, tmp_path):
  ev = _evaluator(val_source, _oracle(
      val_source, lambda s, i: (np.zeros_like(s), np.zeros_like(i))),
      str(tmp_path))
  metrics = ev.run({}, {}, step=1)
  assert metrics["pq"] == 0.0 and metrics["num_images"] == 5


def test_skipped_bad_example_is_left_out_of_predictions_and_gt(tmp_path):
  # One truncated ground-truth PNG with skip_bad_examples: the source hands
  # the next image in its place; that copy must not be scored twice, and the
  # bad image must be left out of both sides of PQ and named.
  root = str(tmp_path / "ds")
  synthetic.generate(root, num_train=2, num_val=5, image_size=SIZE, seed=3)
  meta = coco_panoptic.CocoPanopticSource(root, "val").metadata
  with open(meta.gt_json) as f:
    gt = json.load(f)
  bad = gt["annotations"][1]
  png = os.path.join(meta.gt_folder, bad["file_name"])
  with open(png, "rb") as f:
    data = f.read()
  with open(png, "wb") as f:
    f.write(data[: len(data) // 2])
  source = coco_panoptic.CocoPanopticSource(root, "val",
                                            skip_bad_examples=True)
  merge = _oracle(source, lambda s, i: (s, np.where(i > 0, 1, 0)))
  workdir = tmp_path / "w"
  metrics = _evaluator(source, merge, str(workdir)).run({}, {}, step=2)

  good = [a for a in gt["annotations"] if a is not bad]
  pred_dir = workdir / "predictions" / "panoptic_step2"
  with open(pred_dir / "panoptic.json") as f:
    written = json.load(f)
  assert [a["image_id"] for a in written["annotations"]] == [
      a["image_id"] for a in good]
  assert [im["id"] for im in written["images"]] == [
      a["image_id"] for a in good]
  assert metrics["num_images"] == 4 and metrics["skipped_examples"] == 1
  assert sorted(os.listdir(pred_dir / "panoptic")) == sorted(
      a["file_name"] for a in good)
  with open(pred_dir / "metrics.json") as f:
    saved = json.load(f)
  assert saved["num_images"] == 4
  assert saved["skipped_examples"] == [{
      "index": 1, "image_id": bad["image_id"],
      "file_name": next(im["file_name"] for im in gt["images"]
                        if im["id"] == bad["image_id"])}]
  # Offline scoring of exactly the evaluated images gives the same PQ.
  subset = dict(gt, annotations=good, images=[
      im for im in gt["images"] if im["id"] != bad["image_id"]])
  subset_json = tmp_path / "gt_subset.json"
  subset_json.write_text(json.dumps(subset))
  offline = panoptic.pq_compute(
      str(subset_json), str(pred_dir / "panoptic.json"),
      gt_folder=meta.gt_folder, pred_folder=str(pred_dir / "panoptic"))
  assert 0.0 < metrics["pq"] < 1.0
  for group, key in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
    assert metrics[f"pq{key}"] == offline[group]["pq"]
    assert metrics[f"sq{key}"] == offline[group]["sq"]
  # Without skipping the same split is an error, not a silent substitute.
  with pytest.raises(coco_panoptic.BadExampleError, match=bad["file_name"]):
    _evaluator(coco_panoptic.CocoPanopticSource(root, "val"), merge,
               str(tmp_path / "strict")).run({}, {}, step=2)
