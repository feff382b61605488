"""Video data: synthetic clips, clip preprocessing, the J&F evaluator."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pix2seq_d_jax import data, sharding
from pix2seq_d_jax.data import preprocess, synthetic_video
from pix2seq_d_jax.evaluation import davis as davis_eval
from pix2seq_d_jax.evaluators import davis_video
from pix2seq_d_jax.formats import davis as davis_format
from tests.multiprocess_worker import narrow_model_flags

# Rectangular frames (height 32, width 48): the generator, the DAVIS reader,
# the evaluator and the entry point below all work on (h, w).
PARAMS = dict(num_train=3, num_val=2, num_frames=5, image_size=(32, 48),
              seed=1)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
  return synthetic_video.ensure_synthetic_video(
      str(tmp_path_factory.mktemp("sv")), **PARAMS)


def test_synthetic_video_layout_and_motion(video_root):
  assert video_root == synthetic_video.ensure_synthetic_video(
      os.path.dirname(video_root), **PARAMS)  # Cached, not regenerated.
  src = data.get_source("davis", data_dir=video_root, split="train",
                        task="unsupervised")
  assert src.sequence_names == ["train-0000", "train-0001", "train-0002"]
  moved = 0
  for name in src.sequence_names:
    seq = src.read_sequence(name)
    inst = seq["instance"]
    assert inst.shape == (5, 32, 48)
    assert seq["image"].shape == (5, 32, 48, 3)
    # Every object of the sequence is in the first frame (the DAVIS scorer
    # counts objects there), and ids are 1..n.
    ids = set(np.unique(inst[0])) - {0}
    assert ids == set(range(1, len(ids) + 1)) and ids
    assert set(np.unique(inst)) - {0} <= ids
    np.testing.assert_array_equal(seq["semantic"], np.where(inst > 0, 2, 1))
    moved += int(any((inst[t] != inst[0]).any() for t in range(1, 5)))
  assert moved >= 2  # Objects move.
  # Both annotation folders hold the same ids.
  semi = data.get_source("davis", data_dir=video_root, split="val",
                         task="semi-supervised")
  unsup = data.get_source("synthetic_video", data_dir=os.path.dirname(
      video_root), split="val", **PARAMS)
  np.testing.assert_array_equal(semi.read_sequence("val-0000")["instance"],
                                unsup.read_sequence("val-0000")["instance"])


def _clip():
  """3 frames of 20x30: an object (id 5) moving right, another (id 9)."""
  image = np.zeros((3, 20, 30, 3), np.uint8)
  image[..., 0] = np.arange(30, dtype=np.uint8)[None, None, :] * 8
  image[..., 1] = np.arange(20, dtype=np.uint8)[None, :, None] * 12
  sem = np.ones((3, 20, 30), np.int32)
  inst = np.zeros((3, 20, 30), np.int32)
  for t in range(3):
    inst[t, 4:10, 2 + 3 * t:8 + 3 * t] = 5
    inst[t, 12:18, 20:28] = 9
  sem[inst > 0] = 2
  return {"image": image, "semantic": sem, "instance": inst,
          "crowd": np.zeros((3, 20, 30), bool),
          "image_id": np.asarray(7, np.int64)}


@pytest.mark.parametrize("seed", range(4))
def test_clip_preprocessing_shares_augmentation_and_ids(seed):
  raw = _clip()
  out = preprocess.preprocess_train_clip(
      raw, np.random.default_rng(seed), proceeding_frames=(-2, -1),
      image_size=32, mask_size=16, max_instances=16, scale_range=(0.7, 1.5),
      flip=True, color_jitter_strength=0.0)
  assert out["image"].shape == (32, 32, 3)
  assert out["cond_semantic"].shape == out["cond_instance"].shape == (
      2, 16, 16)
  # The target is the last frame: re-running the plain per-frame op with the
  # same random draws on the last frame alone gives the same image.
  single = {k: raw[k][-1] for k in ("image", "semantic", "instance", "crowd")}
  single["image_id"] = raw["image_id"]
  ref = preprocess.preprocess_train(
      single, np.random.default_rng(seed), image_size=32, mask_size=16,
      max_instances=16, scale_range=(0.7, 1.5), flip=True,
      color_jitter_strength=0.0)
  np.testing.assert_array_equal(out["image"], ref["image"])
  # One id table for the clip: two objects, so at most two ids over all
  # frames (ids drawn per frame from 1..15 would almost never agree).
  frames = [*out["cond_instance"], out["instance"]]
  assert 1 <= len({int(v) for f in frames for v in np.unique(f)} - {0}) <= 2
  for sem, inst in zip([*out["cond_semantic"], out["semantic"]], frames,
                       strict=True):
    assert ((inst > 0) == (sem == 2)).all()
  # A static clip: every frame comes out identical (same flip, jitter, crop
  # and ids), so image and labels stay aligned across the clip.
  still = {k: np.repeat(v[-1:], 3, axis=0) if k != "image_id" else v
           for k, v in raw.items()}
  out = preprocess.preprocess_train_clip(
      still, np.random.default_rng(seed), proceeding_frames=(-2, -1),
      image_size=32, mask_size=16, max_instances=16, scale_range=(0.7, 1.5))
  for f in range(2):
    np.testing.assert_array_equal(out["cond_instance"][f], out["instance"])
    np.testing.assert_array_equal(out["cond_semantic"][f], out["semantic"])


def test_clip_too_short_is_an_error():
  with pytest.raises(ValueError, match="proceeding_frames"):
    preprocess.preprocess_train_clip(
        _clip(), np.random.default_rng(0), proceeding_frames=(-3, -1),
        image_size=32, mask_size=16, max_instances=8)


def test_result_ids_renumber_by_first_appearance():
  things = np.array([False, False, True])
  sem = np.full((2, 2, 3), 2)
  inst = np.array([[[0, 7, 7], [3, 3, 0]], [[3, 0, 0], [9, 9, 9]]])
  sem[1, 1, 2] = 1  # A background pixel keeps no id.
  ids = davis_video.result_ids(sem, inst, things)
  np.testing.assert_array_equal(
      ids, [[[0, 1, 1], [2, 2, 0]], [[2, 0, 0], [3, 3, 0]]])
  # More than 20 objects: the 20 largest survive.
  inst = np.arange(1, 26)[None, None, :].repeat(2, 1)
  inst[:, :, :3] = 0
  inst[0, 0, 3:] = np.arange(1, 23) + 100  # Bigger ids, two pixels each.
  ids = davis_video.result_ids(np.full(inst.shape, 2), inst, things)
  assert ids.max() == 20


def test_davis_evaluator_scores_an_oracle_one(video_root, tmp_path):
  src = data.get_source("davis", data_dir=video_root, split="val")
  names = src.sequence_names
  gt = {n: src.read_sequence(n)["instance"] for n in names}
  calls = []

  def oracle(params, batch_stats, frames, rng):
    del params, batch_stats, rng
    b, length = frames.shape[:2]
    index = len(calls)
    calls.append(frames.shape)
    # Masks at the (32, 64) input: the 32x48 frames plus 16 padded columns.
    inst = np.zeros((b, length, 32, 64), np.int32)
    for row in range(b):
      seq = gt[names[min(index * b + row, len(names) - 1)]]
      inst[row, :len(seq), :, :48] = seq
    return jnp.asarray(np.where(inst > 0, 2, 1)), jnp.asarray(inst)

  mesh = sharding.make_mesh([("data", -1)])
  config = ml_collections.ConfigDict(dict(
      type="davis_video", batch_size=1, task="unsupervised",
      length_bucket=8, max_sequences=None))
  evaluator = davis_video.DavisVideoEvaluator(
      name="davis", config=config, predict_fn=oracle, source=src,
      preprocess_fn=lambda raw: preprocess.preprocess_eval(
          raw, image_size=(32, 64), mask_size=(32, 64)),
      mesh=mesh, seed=0, workdir=str(tmp_path))
  metrics = evaluator.run({}, {}, step=3)
  assert calls == [(1, 8, 32, 64, 3)] * 2  # 5 frames padded to the bucket.
  assert metrics["J&F-Mean"] == 1.0 and metrics["J-Recall"] == 1.0
  assert metrics["num_objects"] == sum(int(g[0].max()) for g in gt.values())
  # The written PNGs are a DAVIS results folder the CLI scores the same.
  results = os.path.join(tmp_path, "predictions", "davis_step3")
  cli = davis_eval.evaluate(video_root, results, "unsupervised", "val")
  assert cli["J&F-Mean"] == 1.0
  assert jax.device_count() >= 1


@pytest.mark.slow
def test_davis_config_trains_one_step_on_a_davis_layout(video_root, tmp_path):
  # The shipped DAVIS recipe (clips of frames -2, -1, 0, frame dropout,
  # 3 classes, 16 instances) on a DAVIS-layout folder, at a toy rectangular
  # resolution (32x48 frames in a 32x64 input, 8x16 masks) with the
  # skeleton model so one step runs on a CPU in seconds (the paper-size
  # model is built with jax.eval_shape in test_config_lib).
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / "w")
  proc = subprocess.run(
      [sys.executable, "-m", "pix2seq_d_jax.main", "--config=configs/davis.py",
       f"--workdir={workdir}", f"--config.input.data_dir={video_root}",
       "--config.input.image_size=(32,64)", "--config.input.mask_size=8,16",
       "--config.input.batch_size=1", "--config.total_steps=1",
       *narrow_model_flags(),
       "--config.log_training_steps=1", "--config.evals.davis.batch_size=1",
       "--config.evals.davis.max_sequences=1",
       "--config.diffusion.sample_steps=2",
       "--config.diffusion.sample_steps_later=1"],
      cwd=repo, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    record = json.loads(f.readline())
  assert record["step"] == 1 and np.isfinite(record["train/loss"])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))
  # The J&F evaluator ran on the first val sequence and wrote its frames.
  with open(os.path.join(workdir, "metrics.json")) as f:
    davis = json.load(f)["davis"]
  assert 0.0 <= davis["J&F-Mean"] <= 1.0 and davis["num_objects"] >= 1
  folder = os.path.join(workdir, "predictions", "davis_step1", "val-0000")
  assert sorted(os.listdir(folder)) == [f"{t:05d}.png" for t in range(5)]
  # Predictions cropped back and resized to the 32x48 frames.
  for name in sorted(os.listdir(folder)):
    ids = davis_format.read_palette_png(os.path.join(folder, name))
    assert ids.shape == (32, 48) and ids.max() <= 16
