"""The predict CLI on a real (untrained) checkpoint of the tiny config.

A checkpoint is written the way training writes it (no training step runs);
`predict_images` then segments two JPEGs of different sizes and aspect
ratios and a grey PNG. The outputs are checked against the inputs and the
dataset's own JSON: original sizes, ids listed with exact areas and boxes,
dataset category ids, overlay and trajectory geometry, and identical
results for the same seed whatever the batch and the trajectory option.
"""

import glob
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from pix2seq_d_jax import checkpointing, predict, train_state
from pix2seq_d_jax.data import panoptic_format
from pix2seq_d_jax.evaluators import visualize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (file name, height, width, PIL mode) of the inputs.
INPUTS = (("a.jpg", 48, 30, "RGB"), ("b.jpg", 20, 70, "RGB"),
          ("c.png", 33, 33, "L"))


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
  # Plumbing and geometry are checked, not XLA's output quality.
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _write_inputs(folder):
  rng = np.random.default_rng(0)
  os.makedirs(folder)
  for name, h, w, mode in INPUTS:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    # Smooth content plus noise, so JPEG keeps it recognisable.
    ramp = np.linspace(0, 200, w)[None, :] + np.linspace(0, 50, h)[:, None]
    pixels = ramp.reshape(ramp.shape + (1,) * (len(shape) - 2))
    pixels = pixels + rng.integers(0, 50, shape)
    Image.fromarray(pixels.astype(np.uint8), mode).save(
        os.path.join(folder, name))
  # Not images: skipped when reading the folder.
  open(os.path.join(folder, "notes.txt"), "w").close()
  open(os.path.join(folder, ".hidden.png"), "w").close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  config = synthetic.get_config("tiny")
  config.input.data_dir = str(root / "data")
  model = train_state.build_model(config)
  tx, _ = train_state.make_optimizer(config.optax, total_steps=4,
                                     warmup_steps=1)
  init_fn = train_state.make_init_fn(
      model, tx, image_size=config.input.image_size,
      mask_size=config.input.mask_size,
      num_bits=2 * config.diffusion.bits_per_channel)
  state = jax.jit(lambda r: nn.unbox(init_fn(r)))(jax.random.key(1))
  # Raw params differ from the EMA params, which predictions must use.
  state = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
  workdir = str(root / "work")
  manager = checkpointing.make_manager(workdir, keep=1)
  checkpointing.save(manager, 4, state, force=True)
  manager.wait_until_finished()
  manager.close()
  inputs = str(root / "inputs")
  _write_inputs(inputs)
  out = str(root / "out")
  result = predict.predict_images(config, workdir, inputs, out, None, True)
  return dict(config=config, workdir=workdir, inputs=inputs, out=out,
              result=result, state=state, root=root)


def test_list_images_sorted_and_filtered(run):
  paths = predict.list_images(run["inputs"])
  assert [os.path.basename(p) for p in paths] == [n for n, *_ in INPUTS]
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    predict.list_images([run["inputs"], os.path.join(run["root"],
                                                     "missing.jpg")])


def test_uses_ema_weights(run):
  meta = predict.load_metadata(run["config"])
  predictor = predict.Predictor(run["config"], run["workdir"], metadata=meta)
  jax.tree.map(np.testing.assert_array_equal, predictor.params,
               run["state"].ema_params)
  assert predictor.steps == run["config"].diffusion.sample_steps


def test_panoptic_pngs_and_json(run):
  out = run["out"]
  with open(os.path.join(out, "panoptic.json")) as f:
    written = json.load(f)
  assert written == run["result"]
  (gt_json,) = glob.glob(os.path.join(
      run["config"].input.data_dir, "**", "panoptic_val2017.json"),
      recursive=True)
  with open(gt_json) as f:
    categories = json.load(f)["categories"]
  assert written["categories"] == categories
  dataset_ids = {c["id"] for c in categories}
  assert [im["file_name"] for im in written["images"]] == [
      n for n, *_ in INPUTS]
  for (name, h, w, _), image, ann in zip(
      INPUTS, written["images"], written["annotations"], strict=True):
    assert (image["height"], image["width"]) == (h, w)
    assert ann["image_id"] == image["id"]
    ids = panoptic_format.read_panoptic_png(
        os.path.join(out, "panoptic", ann["file_name"]))
    assert ids.shape == (h, w)
    segments = {s["id"]: s for s in ann["segments_info"]}
    assert len(segments) == len(ann["segments_info"]) > 0
    present = set(np.unique(ids).tolist()) - {0}
    assert present == set(segments), name
    for seg_id, seg in segments.items():
      ys, xs = np.nonzero(ids == seg_id)
      assert seg["area"] == ys.size
      assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                             ys.max() - ys.min() + 1]
      assert seg["category_id"] in dataset_ids
      assert seg["iscrowd"] == 0


def test_overlays(run):
  for name, h, w, _ in INPUTS:
    stem = os.path.splitext(name)[0]
    overlay = np.asarray(Image.open(
        os.path.join(run["out"], "overlays", f"{stem}.png")))
    assert overlay.shape == (h, 2 * w + 4, 3)
    image = np.asarray(Image.open(
        os.path.join(run["inputs"], name)).convert("RGB"))
    np.testing.assert_array_equal(overlay[:, :w], image)
    # Segments are blended in (and labelled) on the right panel.
    assert np.any(overlay[:, w + 4:] != image)


def test_trajectory_strip_and_gif(run):
  config = run["config"]
  steps = config.diffusion.sample_steps
  size, mask = config.input.image_size, config.input.mask_size
  for name, h, w, _ in INPUTS:
    stem = os.path.splitext(name)[0]
    scale = size / max(h, w)
    # Content of the padded mask: the resized image divided by the stride.
    mh = math.ceil(round(h * scale) / (size // mask))
    mw = math.ceil(round(w * scale) / (size // mask))
    folder = os.path.join(run["out"], "trajectories")
    strip = Image.open(os.path.join(folder, f"{stem}.png"))
    assert strip.size == (steps * mw, mh)
    gif = Image.open(os.path.join(folder, f"{stem}.gif"))
    assert gif.n_frames == steps


def test_same_seed_same_result_in_any_batch(run):
  # Another batch size and order, the checkpoints/ folder as path, and no
  # trajectory: every image starts from the same noise, so each PNG is
  # identical to the first run's.
  out = str(run["root"] / "out2")
  inputs = [os.path.join(run["inputs"], n) for n in ("c.png", "a.jpg")]
  result = predict.predict_images(
      run["config"], os.path.join(run["workdir"], "checkpoints"), inputs,
      out)
  assert [im["file_name"] for im in result["images"]] == ["c.png", "a.jpg"]
  assert not os.path.exists(os.path.join(out, "trajectories"))
  first = {a["file_name"]: a for a in run["result"]["annotations"]}
  for ann in result["annotations"]:
    png = ann["file_name"]
    np.testing.assert_array_equal(
        panoptic_format.read_panoptic_png(os.path.join(out, "panoptic", png)),
        panoptic_format.read_panoptic_png(
            os.path.join(run["out"], "panoptic", png)))
    assert ann["segments_info"] == first[png]["segments_info"]


def test_colorize_pairs():
  is_thing = np.array([False, False, True])
  semantic = np.array([[[0, 1, 1, 2, 2, 2]], [[0, 1, 1, 2, 2, 2]]])
  instance = np.array([[[5, 0, 3, 1, 1, 2]], [[0, 7, 3, 2, 1, 2]]])
  rgb = visualize.colorize_pairs(semantic, instance, is_thing)
  assert rgb.shape == (2, 1, 6, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[:, 0, 0], 0)  # Void is black.
  # Stuff ignores the instance id; a thing pair keeps its colour across
  # frames; different pairs differ.
  for frame, k in ((0, 2), (1, 1), (1, 2)):
    np.testing.assert_array_equal(rgb[frame, 0, k], rgb[0, 0, 1])
  np.testing.assert_array_equal(rgb[0, 0, 3], rgb[1, 0, 4])
  np.testing.assert_array_equal(rgb[0, 0, 5], rgb[1, 0, 3])
  colours = {tuple(rgb[0, 0, k]) for k in (1, 3, 5)}
  assert len(colours) == 3 and (0, 0, 0) not in colours


def test_cli_missing_input_is_one_line_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "pix2seq_d_jax.predict",
       "--config=configs/synthetic.py:tiny", f"--checkpoint={tmp_path}",
       f"--output={tmp_path / 'out'}"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert "--input" in lines[0]
  assert not os.path.exists(tmp_path / "out")
