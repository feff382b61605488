"""The predict CLI on a real (untrained) checkpoint of the tiny configs.

The configs' model is the skeleton one (`NARROW_MODEL`): the prediction
plumbing is under test, and its programs compile in a fraction of the time.

A checkpoint is written the way training writes it (no training step runs);
`predict_images` then segments two JPEGs of different sizes and aspect
ratios and a grey PNG, at a rectangular (32, 64) input with (16, 32) masks.
The outputs are checked against the inputs and the dataset's own JSON:
original sizes, ids listed with exact areas and boxes, dataset category
ids, overlay and trajectory geometry, and identical results for the same
seed whatever the batch and the trajectory option.
Video input: a fake DAVIS `JPEGImages/480p/` folder of two sequences gives
DAVIS-palette PNGs at each frame's size whose values are the instance ids of
the thing segments that the same frames get when predicted as images.
Frame-conditioned model (`synthetic.py:video,tiny` at a (32, 48) input,
untrained but for a random output layer): two sequences of 3 and 5 frames
give PNGs equal to `result_ids` of the video predict function run by the
test itself, the same with another length bucket and batch size through the
CLI, and a single image is segmented as the first frame of a sequence.
"""

import glob
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from pix2seq_d_jax import checkpointing, config_lib, experiment, predict
from pix2seq_d_jax.data import preprocess
from pix2seq_d_jax.evaluators import davis_video, postprocess, visualize
from pix2seq_d_jax.formats import coco_panoptic as coco_format
from pix2seq_d_jax.formats import davis as davis_format
from pix2seq_d_jax.inference import inputs, video_predictor, writers
from tests.multiprocess_worker import NARROW_MODEL, narrow_model_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (file name, height, width, PIL mode) of the inputs.
INPUTS = (("a.jpg", 48, 30, "RGB"), ("b.jpg", 20, 70, "RGB"),
          ("c.png", 33, 33, "L"))
# DAVIS-like sequences: name -> (frames, height, width).
SEQUENCES = {"bear": (3, 50, 70), "car-turn": (2, 36, 28)}


def _write_image(path, h, w, mode, rng):
  shape = (h, w, 3) if mode == "RGB" else (h, w)
  # Smooth content plus noise, so JPEG keeps it recognisable.
  ramp = np.linspace(0, 200, w)[None, :] + np.linspace(0, 50, h)[:, None]
  pixels = ramp.reshape(ramp.shape + (1,) * (len(shape) - 2))
  pixels = pixels + rng.integers(0, 50, shape)
  Image.fromarray(pixels.astype(np.uint8), mode).save(path)


def _write_inputs(folder):
  rng = np.random.default_rng(0)
  os.makedirs(folder)
  for name, h, w, mode in INPUTS:
    _write_image(os.path.join(folder, name), h, w, mode, rng)
  # Not images: skipped when reading the folder.
  open(os.path.join(folder, "notes.txt"), "w").close()
  open(os.path.join(folder, ".hidden.png"), "w").close()


# The image model predicts at a (height, width) input: every input below is
# fit into 32x64 and its 16x32 masks are cropped and resized back.
RECT_IMAGE, RECT_MASK = (32, 64), (16, 32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  config = synthetic.get_config("tiny")
  config.model.update(NARROW_MODEL)
  config.input.image_size, config.input.mask_size = RECT_IMAGE, RECT_MASK
  config.input.data_dir = str(root / "data")
  state = experiment.create(config, total_steps=4).init_state(
      jax.random.key(1))
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
  paths = inputs.list_images(run["inputs"])
  assert [os.path.basename(p) for p in paths] == [n for n, *_ in INPUTS]
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    inputs.list_images([run["inputs"], os.path.join(run["root"],
                                                     "missing.jpg")])


def test_uses_ema_weights(run):
  meta = experiment.create(run["config"]).eval_metadata()
  predictor = predict.load_predictor(run["config"], run["workdir"],
                                     metadata=meta)
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
    ids = coco_format.read_panoptic_png(
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
    # The panels, then a legend strip for labels too big for their segment.
    assert overlay.shape[0] >= h and overlay.shape[1:] == (2 * w + 4, 3)
    image = np.asarray(Image.open(
        os.path.join(run["inputs"], name)).convert("RGB"))
    np.testing.assert_array_equal(overlay[:h, :w], image)
    # Segments are blended in (and labelled) on the right panel.
    assert np.any(overlay[:h, w + 4:] != image)


def test_trajectory_strip_and_gif(run):
  config = run["config"]
  steps = config.diffusion.sample_steps
  (size_h, size_w), (mask_h, _) = RECT_IMAGE, RECT_MASK
  stride = size_h // mask_h
  for name, h, w, _ in INPUTS:
    stem = os.path.splitext(name)[0]
    # The image fits the 32x64 box at one scale (48x30 -> 32x20, 20x70 ->
    # 18x64, 33x33 -> 32x32); the content of the padded mask is the
    # resized image divided by the stride.
    scale = min(size_h / h, size_w / w)
    mh = math.ceil(round(h * scale) / stride)
    mw = math.ceil(round(w * scale) / stride)
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
        coco_format.read_panoptic_png(os.path.join(out, "panoptic", png)),
        coco_format.read_panoptic_png(
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


# ------------------------------------------------------------------ video


def _write_davis(root):
  """JPEGImages/480p/<seq>/<00000>.jpg frames; returns the 480p folder."""
  rng = np.random.default_rng(1)
  folder = os.path.join(root, "JPEGImages", "480p")
  for seq, (n, h, w) in SEQUENCES.items():
    os.makedirs(os.path.join(folder, seq))
    for k in range(n):
      _write_image(os.path.join(folder, seq, f"{k:05d}.jpg"), h, w, "RGB",
                   rng)
  open(os.path.join(folder, "bear", "notes.txt"), "w").close()
  os.makedirs(os.path.join(folder, "no_frames"))  # Skipped: holds no image.
  return folder


@pytest.fixture(scope="module")
def video(run):
  """One predictor writes the video results and the same frames as images."""
  root = run["root"] / "davis"
  davis = _write_davis(str(root))
  sequences = inputs.list_sequences(davis)
  frames = [p for _, paths in sequences for p in paths]
  predictor = predict.load_predictor(run["config"], run["workdir"],
                                     batch_size=4)
  out = str(root / "results")
  written = writers.write_video_predictions(predictor, sequences, out)
  as_images = str(root / "as_images")
  result = writers.write_predictions(predictor, frames, as_images)
  images = [coco_format.read_rgb_image(p) for p in frames]
  preds = predictor.predict(images)
  valid = [predictor.preprocess(im)["valid_size"] for im in images]
  return dict(davis=davis, sequences=sequences, out=out, written=written,
              as_images=as_images, result=result, preds=preds, valid=valid,
              meta=predictor.meta, min_pixels=predictor.min_pixels,
              stuff_identity=run["config"].input.stuff_identity)


def test_sequence_layouts(run, tmp_path):
  davis = _write_davis(str(tmp_path))
  seqs = inputs.list_sequences(davis)
  assert [s for s, _ in seqs] == ["bear", "car-turn"]
  assert [os.path.basename(p) for p in seqs[0][1]] == [
      "00000.jpg", "00001.jpg", "00002.jpg"]
  # One sequence folder is one sequence named after it.
  bear = os.path.join(davis, "bear")
  assert inputs.list_sequences(bear) == [("bear", seqs[0][1])]
  # Only a folder of sequence folders is detected without --video.
  assert inputs.is_sequence_root(davis)
  assert not inputs.is_sequence_root(bear)
  assert not inputs.is_sequence_root(run["inputs"])
  assert not inputs.is_sequence_root(seqs[0][1][0])
  os.makedirs(tmp_path / "bad" / "overlays")
  os.rename(seqs[0][1][0], tmp_path / "bad" / "overlays" / "00000.jpg")
  with pytest.raises(ValueError, match="'overlays'"):
    inputs.list_sequences(str(tmp_path / "bad"))
  with pytest.raises(FileNotFoundError, match="no frames"):
    inputs.list_sequences(os.path.join(davis, "no_frames"))


def test_video_palette_pngs(video):
  assert video["written"] == {
      seq: [f"{k:05d}.png" for k in range(n)]
      for seq, (n, _, _) in SEQUENCES.items()}
  palette = davis_format.davis_palette()
  for seq, (n, h, w) in SEQUENCES.items():
    for k in range(n):
      image = Image.open(os.path.join(video["out"], seq, f"{k:05d}.png"))
      assert image.mode == "P" and image.size == (w, h)
      np.testing.assert_array_equal(
          np.asarray(image.getpalette(), np.uint8).reshape(-1, 3), palette)
      overlay = Image.open(
          os.path.join(video["out"], "overlays", seq, f"{k:05d}.png"))
      assert overlay.size[0] == 2 * w + 4 and overlay.size[1] >= h
  assert sorted(os.listdir(video["out"])) == ["bear", "car-turn", "overlays"]


def test_video_values_are_instance_ids_of_thing_segments(video):
  meta = video["meta"]
  thing_categories = {int(c["id"]) for c in meta.categories if c["isthing"]}
  frames = [(seq, os.path.basename(p)) for seq, paths in video["sequences"]
            for p in paths]
  annotations = video["result"]["annotations"]
  num_things = 0
  for (seq, frame), ann, pred, valid in zip(
      frames, annotations, video["preds"], video["valid"], strict=True):
    objects = np.asarray(Image.open(os.path.join(
        video["out"], seq, frame.replace(".jpg", ".png"))))
    panoptic = coco_format.read_panoptic_png(
        os.path.join(video["as_images"], "panoptic", ann["file_name"]))
    assert objects.shape == panoptic.shape
    things = sorted(s["id"] for s in ann["segments_info"]
                    if s["category_id"] in thing_categories)
    in_things = np.isin(panoptic, things)
    # Background, stuff and void are 0; each thing segment is one id.
    np.testing.assert_array_equal(objects[~in_things], 0)
    values = []
    for seg_id in things:
      (value,) = np.unique(objects[panoptic == seg_id])
      values.append(int(value))
    # The instance ids that survive post-processing, computed from the
    # decoded masks at the frame's size (the reference chain: the stride-2
    # upsampling of the cropped masks, the content crop, the resize); at
    # least min_pixels original pixels. 'zero' counts an id's thing pixels;
    # 'random' its pixels, kept when their majority class is a thing.
    # Segments are numbered in instance-id order, so the k-th thing segment
    # carries the k-th kept id.
    semantic, instance = (postprocess.resize_to_original(
        x, valid_size=valid,
        image_size=[n * RECT_IMAGE[0] // RECT_MASK[0] for n in x.shape],
        orig_size=panoptic.shape) for x in (pred.semantic, pred.instance))
    if video["stuff_identity"] == "zero":
      ids, counts = np.unique(instance[meta.is_thing[semantic]],
                              return_counts=True)
      is_kept_class = [True] * len(ids)
    else:
      ids, counts = np.unique(instance, return_counts=True)
      is_kept_class = [
          meta.is_thing[np.bincount(semantic[instance == i]).argmax()]
          for i in ids]
    kept = [int(i) for i, c, t in zip(ids, counts, is_kept_class, strict=True)
            if i > 0 and t and c >= video["min_pixels"]]
    assert values == kept, (seq, frame)
    num_things += len(things)
  assert num_things > 0  # The check above is not vacuous.


def test_video_single_sequence_end_to_end(run, video):
  # predict_videos on one sequence folder: same seed, so the same PNGs as
  # the fixture's folder-of-sequences run (another batch size), and
  # trajectories under trajectories/<seq>/.
  out = str(run["root"] / "davis_one")
  written = predict.predict_videos(
      run["config"], run["workdir"], os.path.join(video["davis"], "car-turn"),
      out, save_trajectory=True)
  assert written == {"car-turn": ["00000.png", "00001.png"]}
  for png in written["car-turn"]:
    np.testing.assert_array_equal(
        np.asarray(Image.open(os.path.join(out, "car-turn", png))),
        np.asarray(Image.open(os.path.join(video["out"], "car-turn", png))))
    stem = png[:-4]
    gif = Image.open(os.path.join(out, "trajectories", "car-turn",
                                  f"{stem}.gif"))
    assert gif.n_frames == run["config"].diffusion.sample_steps


# ------------------------------------------------- frame-conditioned model

# Sequences of different lengths for the video model: name -> frames.
CLIPS = {"long": 5, "short": 3}
CLIP_HW = (40, 50)
# The video model's (height, width) input and masks.
VIDEO_IMAGE, VIDEO_MASK = (32, 48), (16, 24)


def _randomise_output_layer(params):
  # A fresh decoder's zero-initialised output layer ignores its inputs (and
  # every pixel would get the same masks): random weights make the masks
  # depend on the frames and on the conditioning.
  conv_out = params["decoder"]["conv_out"]
  kernel = 0.3 * jax.random.normal(jax.random.key(5), conv_out["kernel"].shape)
  return dict(params, decoder=dict(
      params["decoder"], conv_out=dict(conv_out, kernel=kernel)))


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
  """`synthetic.py:video,tiny` checkpoint; its predictions, bucket 4."""
  root = tmp_path_factory.mktemp("predict_video")
  config = synthetic.get_config("video,tiny")
  config.model.update(NARROW_MODEL)
  config.input.image_size, config.input.mask_size = VIDEO_IMAGE, VIDEO_MASK
  config.input.data_dir = str(root / "data")
  exp = experiment.create(config, total_steps=4)
  state = exp.init_state(jax.random.key(2))
  state = state.replace(ema_params=_randomise_output_layer(state.ema_params))
  workdir = str(root / "work")
  manager = checkpointing.make_manager(workdir, keep=1)
  checkpointing.save(manager, 2, state, force=True)
  manager.wait_until_finished()
  manager.close()
  rng = np.random.default_rng(2)
  videos = root / "videos"
  for seq, n in CLIPS.items():
    os.makedirs(videos / seq)
    for k in range(n):
      _write_image(str(videos / seq / f"{k:05d}.jpg"), *CLIP_HW, "RGB", rng)
  meta = exp.eval_metadata()  # Writes the synthetic dataset.
  # One sequence per call: 3 frames padded to 4, 5 frames to 8.
  predictor = predict.load_video_predictor(
      config, workdir, batch_size=1, length_bucket=4, metadata=meta)
  sequences = inputs.list_sequences(str(videos))
  out = str(root / "out")
  written = writers.write_clip_predictions(predictor, sequences, out)
  return dict(config=config, exp=exp, state=state, workdir=workdir,
              videos=str(videos), sequences=sequences, out=out,
              written=written, meta=meta, root=root, predictor=predictor)


def _read_ids(folder, seq, n):
  return np.stack([davis_format.read_palette_png(
      os.path.join(folder, seq, f"{k:05d}.png")) for k in range(n)])


def test_video_model_writes_palette_pngs_at_frame_size(video_run):
  assert video_run["written"] == {
      seq: [f"{k:05d}.png" for k in range(n)] for seq, n in CLIPS.items()}
  h, w = CLIP_HW
  for seq, n in CLIPS.items():
    for k in range(n):
      name = f"{k:05d}.png"
      with Image.open(os.path.join(video_run["out"], seq, name)) as image:
        assert image.mode == "P" and image.size == (w, h)
        np.testing.assert_array_equal(
            np.asarray(image.getpalette(), np.uint8).reshape(-1, 3),
            davis_format.davis_palette())
      with Image.open(os.path.join(video_run["out"], "overlays", seq,
                                   name)) as overlay:
        assert overlay.size[0] == 2 * w + 4 and overlay.size[1] >= h
  assert sorted(os.listdir(video_run["out"])) == ["long", "overlays",
                                                   "short"]


def test_video_model_ids_are_result_ids_of_the_video_sampler(video_run):
  # Independently: preprocess the 5 frames, run the video predict function
  # on the unpadded sequence, crop the padding of the masks, resize to the
  # frame size and map with result_ids.
  config, meta = video_run["config"], video_run["meta"]
  size, m = VIDEO_IMAGE, VIDEO_MASK
  n, (h, w) = CLIPS["long"], CLIP_HW
  paths = [os.path.join(video_run["videos"], "long", f"{k:05d}.jpg")
           for k in range(n)]
  zeros = np.zeros((h, w), np.int32)
  frames = np.stack([preprocess.preprocess_eval(
      {"image": coco_format.read_rgb_image(p), "semantic": zeros,
       "instance": zeros, "crowd": zeros.astype(bool), "image_id": 0},
      image_size=size, mask_size=m)["image"] for p in paths])
  sample = jax.jit(video_run["exp"].video_predict_fn(meta.num_classes))
  state = video_run["state"]
  semantic, instance = sample(state.ema_params, state.batch_stats,
                              frames[None], jax.random.key(config.seed))
  # 40x50 fits 32x48 at min(32/40, 48/50) = 0.8 as 32x40 -> 16x20 of the
  # 16x24 mask (stride 2).
  assert semantic.shape == instance.shape == (1, n, *VIDEO_MASK)
  vh, vw = 16, 20

  # Pixel-centre nearest neighbour in exact integers: output pixel i reads
  # input pixel floor((i + 0.5) * n / N) (PIL's float version rounds some
  # exact boundaries, such as column 12 of 50 from 16, the other way).
  rows = (2 * np.arange(h) + 1) * vh // (2 * h)
  cols = (2 * np.arange(w) + 1) * vw // (2 * w)

  def to_frame(x):
    return np.asarray(x)[rows[:, None], cols[None, :]]

  expected = davis_video.result_ids(
      np.stack([to_frame(x) for x in semantic[0]]),
      np.stack([to_frame(x) for x in instance[0]]),
      np.asarray(meta.is_thing, bool))
  assert expected.max() >= 1  # The comparison is not of empty maps.
  np.testing.assert_array_equal(_read_ids(video_run["out"], "long", n),
                                expected)


def test_video_model_single_image_is_a_one_frame_sequence(video_run):
  # predict_images runs a video config: the image is the first frame of a
  # sequence, so its panoptic PNG is what frame 0 of the 5-frame sequence
  # gets after post-processing.
  config = video_run["config"]
  first = os.path.join(video_run["videos"], "long", "00000.jpg")
  out = str(video_run["root"] / "single")
  predict.predict_images(config, video_run["workdir"], first, out)
  (clip,) = video_run["predictor"].predict_clips(
      [[coco_format.read_rgb_image(first)]])
  np.testing.assert_array_equal(
      coco_format.read_panoptic_png(
          os.path.join(out, "panoptic", "00000.png")),
      clip.frames[0].segment_ids)
  np.testing.assert_array_equal(
      clip.object_ids, _read_ids(video_run["out"], "long", 1))


def test_cli_video_model_same_pngs_for_any_bucket(video_run, tmp_path):
  # Bucket 8 and two sequences per call pad both sequences to 8 frames
  # (the fixture: bucket 4, one per call, 4 and 8 frames): same PNGs.
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "pix2seq_d_jax.predict",
       "--config=configs/synthetic.py:video,tiny",
       "--config.input.image_size=(32,48)", "--config.input.mask_size=16,24",
       f"--config.input.data_dir={video_run['config'].input.data_dir}",
       f"--checkpoint={video_run['workdir']}",
       f"--input={video_run['videos']}", f"--output={out}",
       "--length_bucket=8", "--batch_size=2", *narrow_model_flags()],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
      "sequences": 2, "frames": 8, "output": str(out)}
  for seq, n in CLIPS.items():
    np.testing.assert_array_equal(_read_ids(out, seq, n),
                                  _read_ids(video_run["out"], seq, n))


def test_video_input_errors(video_run, tmp_path):
  config, videos = video_run["config"], video_run["videos"]
  never, missing = str(tmp_path / "never"), str(tmp_path / "no_checkpoint")
  bad = tmp_path / "bad" / "clip"
  os.makedirs(bad)
  rng = np.random.default_rng(3)
  _write_image(str(bad / "00000.jpg"), 40, 50, "RGB", rng)
  _write_image(str(bad / "00001.jpg"), 30, 50, "RGB", rng)
  # All fail before the (missing) checkpoint is read.
  with pytest.raises(ValueError,
                     match=r"'clip' \(.*bad/clip\).*00001.jpg is 30x50"):
    predict.predict_videos(config, missing, str(tmp_path / "bad"), never)
  with pytest.raises(config_lib.ConfigError, match="--save_trajectory"):
    predict.predict_videos(config, missing, videos, never,
                           save_trajectory=True)
  with pytest.raises(config_lib.ConfigError, match="--length_bucket=0"):
    predict.predict_videos(config, missing, videos, never, length_bucket=0)
  with pytest.raises(config_lib.ConfigError, match="--steps_later=2"):
    predict.predict_videos(synthetic.get_config("tiny"), missing, videos,
                           never, steps_later=2)
  assert not os.path.exists(never)
  assert [video_predictor.padded_length(n, 4) for n in (1, 3, 4, 5, 9)] == [
      4, 4, 4, 8, 12]
