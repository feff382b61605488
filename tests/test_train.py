"""End-to-end: the real entry point on the tiny synthetic config.

Runs `python -m pix2seq_d_jax.main` in subprocesses (as a user would), then
reads what the run left in the workdir: the JSON-lines metrics, checkpoints,
TensorBoard events, COCO-panoptic predictions and overlays. Rerunning the
same command after a SIGTERM continues at the checkpointed step.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.multiprocess_worker import NARROW_MODEL, narrow_model_flags

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The entry point's plumbing is under test, not XLA's code quality.
_FAST_ENV = {"JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def _run(workdir, data_dir, *extra, config="configs/synthetic.py:tiny",
         check=True, timeout=600):
  cmd = [
      sys.executable, "-m", "pix2seq_d_jax.main", f"--config={config}",
      f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
      *extra,
  ]
  env = dict(os.environ, **_FAST_ENV)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=env)
  if check and proc.returncode != 0:
    raise AssertionError(
        f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _ckpt_steps(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


# The finished run is rectangular throughout: 48x80 synthetic scenes, fit
# into a 32x64 input (as 32x53, padded on the right) with 16x32 masks.
RECT_FLAGS = ("--config.input.image_size=(32,64)",
              "--config.input.mask_size=16,32",
              "--config.input.synthetic.image_size=(48,80)")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  workdir, data_dir = str(root / "work"), str(root / "data")
  # The skeleton model: the entry point's outputs are under test here; the
  # tiny model's numerics are covered by test_train_state.py.
  proc = _run(workdir, data_dir, *RECT_FLAGS, *narrow_model_flags())
  return workdir, data_dir, proc.stdout + proc.stderr


def test_run_writes_metrics_checkpoints_predictions(finished_run):
  workdir, *_ = finished_run
  rows = _metrics(workdir)
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == [1, 2, 4]  # first, every 2, last.
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  assert rows[0]["train/lr"] == 0.0  # Warmup starts at 0.
  assert _ckpt_steps(workdir) == [2, 4]
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  with open(os.path.join(workdir, "metrics.json")) as f:
    final = json.load(f)
  assert final["step"] == 4
  pq = final["panoptic"]
  assert 0.0 <= pq["pq"] <= 1.0 and pq["num_images"] == 4
  with open(os.path.join(workdir, "config.json")) as f:
    sizes = json.load(f)["input"]
  assert (sizes["image_size"], sizes["mask_size"]) == ([32, 64], [16, 32])
  # Predictions in COCO panoptic format, one PNG per val image.
  pred_dir = os.path.join(workdir, "predictions", "panoptic_step4")
  with open(os.path.join(pred_dir, "panoptic.json")) as f:
    pred = json.load(f)
  assert len(pred["annotations"]) == 4
  for ann in pred["annotations"]:
    png = np.asarray(Image.open(os.path.join(pred_dir, "panoptic",
                                             ann["file_name"]))).astype(
                                                 np.int64)
    assert png.shape == (48, 80, 3)  # Back at the scene's size.
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    listed = {s["id"] for s in ann["segments_info"]}
    assert set(np.unique(ids)) - {0} == listed
    for s in ann["segments_info"]:
      assert s["area"] == int((ids == s["id"]).sum())
  overlays = glob.glob(os.path.join(workdir, "overlays", "panoptic_step4",
                                    "*.png"))
  assert len(overlays) == 4
  strip = np.asarray(Image.open(overlays[0]))
  assert strip.shape[0] >= 48 and strip.shape[1] >= 3 * 80
  assert strip.shape[2] == 3


def test_sigterm_checkpoints_and_rerun_resumes(tmp_path):
  workdir, data_dir = str(tmp_path / "w"), str(tmp_path / "d")
  cmd = [
      sys.executable, "-m", "pix2seq_d_jax.main",
      "--config=configs/synthetic.py:tiny", f"--workdir={workdir}",
      f"--config.input.data_dir={data_dir}", "--config.total_steps=100000",
      "--config.ckpt_steps=100000", "--config.log_training_steps=1",
      "--mode=train", *narrow_model_flags(),
  ]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, **_FAST_ENV))
  jsonl = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.exists(jsonl) and len(open(jsonl).readlines()) >= 3:
      break
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  saved = _ckpt_steps(workdir)
  assert len(saved) == 1 and saved[0] >= 3
  last_logged = max(r["step"] for r in _metrics(workdir))
  assert saved[0] == last_logged
  _run(workdir, data_dir, f"--config.total_steps={saved[0] + 1}",
       "--mode=train", "--config.log_training_steps=1",
       *narrow_model_flags())
  steps = [r["step"] for r in _metrics(workdir)]
  assert steps[-1] == saved[0] + 1 and steps.count(saved[0] + 1) == 1


def test_terminal_output_is_short_and_ends_with_the_results(finished_run):
  *_, output = finished_run
  lines = output.strip().splitlines()
  assert len(lines) <= 60, "\n".join(lines)
  for noise in ("oneDNN", "Unable to initialize backend", "Traceback",
                "[Hyperparameters]", "cpu_feature_guard"):
    assert noise not in output, noise
  # The parameter table goes to the workdir, one total line to the log.
  assert sum("parameters" in line for line in lines) <= 2
  # It ends with the metrics table (3 significant digits) and the paths.
  tail = "\n".join(lines[-12:])
  assert "Results:" in output and "pq" in tail and "metrics" in tail


def test_failing_final_evaluation_keeps_the_training(tmp_path):
  # A truncated validation PNG (no skipping): the final evaluation fails
  # after the last step. The run exits 2 with one error line, and the final
  # checkpoint is complete and restorable.
  from configs import synthetic as synthetic_config
  from pix2seq_d_jax import checkpointing, experiment
  from pix2seq_d_jax.data import synthetic

  data_dir = str(tmp_path / "d")
  root = synthetic.ensure_synthetic(data_dir, num_train=16, num_val=4,
                                    image_size=64, seed=0)
  folder = os.path.join(root, "annotations", "panoptic_val2017")
  victim = sorted(os.listdir(folder))[1]
  path = os.path.join(folder, victim)
  with open(path, "rb") as f:
    head = f.read(60)
  with open(path, "wb") as f:
    f.write(head)
  workdir = str(tmp_path / "w")
  proc = _run(workdir, data_dir, *narrow_model_flags(), check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines()
            if line.startswith("error:")]
  assert len(errors) == 1 and victim in errors[0], proc.stderr[-3000:]
  for noise in ("Traceback", "Event loop is closed",
                "cannot schedule new futures"):
    assert noise not in proc.stderr, noise
  assert _ckpt_steps(workdir)[-1] == 4
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
  config = synthetic_config.get_config("tiny")
  config.model.update(NARROW_MODEL)  # The run's model.
  exp = experiment.create(config, total_steps=4)
  manager = checkpointing.make_manager(workdir, keep=2)
  try:
    state, _ = checkpointing.restore(manager, 4, exp.abstract_state)
  finally:
    manager.close()
  assert int(state.step) == 4


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.input.mask_size=12"], "config.input.mask_size=12"),
        (["--config.input.bogus=1"], "bogus"),
    ],
)
def test_bad_config_fails_with_one_clear_line(tmp_path, extra, message):
  proc = _run(str(tmp_path / "w"), str(tmp_path / "d"), *extra, check=False)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr


def test_missing_data_folder_is_named(tmp_path):
  missing = str(tmp_path / "nowhere")
  proc = _run(str(tmp_path / "w"), missing, "--config.input.source="
              "coco_panoptic", check=False)
  assert proc.returncode == 2
  assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_label_png_is_named(tmp_path):
  from pix2seq_d_jax.data import synthetic

  data_dir = str(tmp_path / "d")
  root = synthetic.ensure_synthetic(data_dir, num_train=16, num_val=4,
                                    image_size=64, seed=0)
  folder = os.path.join(root, "annotations", "panoptic_train2017")
  # Every label is corrupt, so the first batch (read before compiling)
  # already fails.
  victims = sorted(os.listdir(folder))
  for name in victims:
    with open(os.path.join(folder, name), "wb") as f:
      f.write(b"not a png")
  proc = _run(str(tmp_path / "w"), data_dir, "--mode=train", check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert any(v in proc.stderr for v in victims)
  assert "Traceback" not in proc.stderr
