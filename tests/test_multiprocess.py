"""Several processes on one machine train as one job (jax.distributed, gloo).

Two processes of one CPU device each, each feeding half of a fixed global
batch, must take the same steps as one process fed the whole batch; their
training data shards must be disjoint and cover the split; and the real entry
point started by `launch/local.py` trains, checkpoints and writes
`metrics.jsonl` from process 0 only. A 2-process `train_eval` evaluates
(panoptic PQ, DAVIS J&F) to the same bytes as 1 process on its checkpoint.
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.multiprocess_worker import narrow_model_flags, shared_cache_dir

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
_spec = importlib.util.spec_from_file_location(
    "launch_local", os.path.join(REPO, "launch", "local.py"))
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)


def _env(cache_dir):
  return dict(
      os.environ, JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join(
          [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]),
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      # Plumbing, not XLA's code quality, is under test: compile faster.
      JAX_DISABLE_MOST_OPTIMIZATIONS="1",
  )


def _wait_all(procs, logs, timeout):
  """Waits for every process; a failure kills the rest (its peer would hang)."""
  deadline = time.time() + timeout
  while any(p.poll() is None for p in procs):
    failed = [i for i, p in enumerate(procs) if p.returncode]
    if failed or time.time() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      i = failed[0] if failed else 0
      raise AssertionError(
          f"process {i} failed or timed out:\n{open(logs[i]).read()[-4000:]}")
    time.sleep(0.2)
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, open(log).read()[-4000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  # Generated once here, not concurrently by each worker.
  from configs import synthetic
  from pix2seq_d_jax.data import synthetic as synthetic_data

  root = str(tmp_path_factory.mktemp("data"))
  config = synthetic.get_config("tiny")
  synthetic_data.ensure_synthetic(root, **config.input.synthetic)
  return root


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory, data_dir):
  """Runs the worker as 2 processes, then as 1 process."""
  cache = shared_cache_dir(tmp_path_factory)
  two, one = (str(tmp_path_factory.mktemp(n)) for n in ("two", "one"))
  coordinator = f"127.0.0.1:{local.free_port()}"
  # One job at a time: a third process on 2 cores slows the pair 3-fold (a
  # peer waiting in a collective spins while the other needs the core).
  for jobs in (
      [[two, data_dir, coordinator, "2", str(i)] for i in range(2)],
      [[one, data_dir]],
  ):
    logs = [os.path.join(args[0], f"log_{i}.txt")
            for i, args in enumerate(jobs)]
    procs = []
    for args, log in zip(jobs, logs, strict=True):
      # Output to files: an undrained pipe could block one of the peers.
      with open(log, "w") as f:
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, *args], cwd=REPO, env=_env(cache),
            stdout=f, stderr=subprocess.STDOUT))
    _wait_all(procs, logs, timeout=600)

  def load(folder, i):
    with open(os.path.join(folder, f"result_{i}.json")) as f:
      result = json.load(f)
    with np.load(os.path.join(folder, f"params_{i}.npz")) as z:
      result["params"] = dict(z)
    return result

  return [load(two, 0), load(two, 1)], load(one, 0)


def test_two_processes_train_like_one(worker_runs):
  (p0, p1), single = worker_runs
  assert (p0["process_count"], p0["device_count"]) == (2, 2)
  assert (single["process_count"], single["device_count"]) == (1, 1)
  # The loss is of the whole global batch, in every process.
  assert p0["losses"] == p1["losses"]
  np.testing.assert_allclose(p0["losses"], single["losses"], rtol=1e-5)
  assert len(set(single["losses"])) == 3  # Three different batches.
  assert p0["params"].keys() == single["params"].keys()
  moved = 0.0
  for key, ref in single["params"].items():
    # The all-reduce keeps the replicas identical, bit for bit.
    np.testing.assert_array_equal(p0["params"][key], p1["params"][key])
    # Summation order differs between 1 and 2 devices; Adam's update of a
    # weight whose gradient is near 0 amplifies that, so the tolerance is
    # 1% of one step's largest change (lr = 1e-3).
    np.testing.assert_allclose(p0["params"][key], ref, rtol=1e-5,
                               atol=1e-5, err_msg=key)
    moved = max(moved, float(np.abs(ref).max()))
  assert moved > 0


def test_data_shards_are_disjoint_and_cover_the_split(worker_runs, data_dir):
  (p0, p1), single = worker_runs
  ids0, ids1 = p0["image_ids"], p1["image_ids"]
  assert len(ids0) == len(set(ids0)) == 8
  assert len(ids1) == len(set(ids1)) == 8
  assert not set(ids0) & set(ids1)
  # One process alone reads the whole split in one epoch.
  assert sorted(ids0 + ids1) == sorted(single["image_ids"])
  assert len(single["image_ids"]) == 16


def test_sigterm_to_one_process_stops_both_at_the_same_step(
    tmp_path, tmp_path_factory, data_dir):
  # A preemption notice reaches hosts at different moments: the processes
  # must agree on the step to stop at, save one checkpoint there and exit 0
  # (stopping at different steps would hang the other in a collective).
  cache = shared_cache_dir(tmp_path_factory)
  workdir, log_dir = str(tmp_path / "w"), str(tmp_path / "logs")
  cmd = [
      sys.executable, os.path.join(REPO, "launch", "local.py"),
      "--num_processes=2", f"--log_dir={log_dir}", "--",
      "--config=configs/synthetic.py:tiny", f"--workdir={workdir}",
      f"--config.input.data_dir={data_dir}", "--config.total_steps=100000",
      "--config.ckpt_steps=100000", "--config.log_training_steps=1",
      "--mode=train", *narrow_model_flags(),
  ]
  launcher = subprocess.Popen(cmd, cwd=REPO, env=_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
  try:
    jsonl = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(jsonl) and len(open(jsonl).readlines()) >= 3):
      assert launcher.poll() is None and time.time() < deadline, (
          launcher.stderr.read()[-3000:] if launcher.poll() is not None
          else "timed out")
      time.sleep(0.3)
    candidates = subprocess.run(["pgrep", "-f", "--", "--process_id=1"],
                                capture_output=True, text=True).stdout.split()
    worker = [pid for pid in candidates
              if workdir in open(f"/proc/{pid}/cmdline").read()]
    assert len(worker) == 1, (candidates, worker)
    os.kill(int(worker[0]), 15)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
  finally:
    if launcher.poll() is None:
      launcher.terminate()  # The launcher stops its workers.
      launcher.wait(timeout=60)
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                         "checkpoints"))
                 if n.isdigit())
  with open(jsonl) as f:
    last = max(json.loads(line)["step"] for line in f)
  assert len(saved) == 1 and saved[0] == last >= 3
  for i in range(2):
    log = open(os.path.join(log_dir, f"process_{i}.log")).read()
    assert f"Stopped by signal at step {saved[0]}" in log, log[-2000:]
  # The checkpoint holds each process's own input position (grain refuses
  # another shard's), so the same job resumes on both processes.
  _launch(["--config=configs/synthetic.py:tiny",
           f"--config.input.data_dir={data_dir}",
           f"--config.total_steps={saved[0] + 2}", "--config.ckpt_steps=100000",
           "--config.log_training_steps=1", "--mode=train"],
          workdir, cache, num_processes=2)
  with open(jsonl) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, saved[0] + 3)), steps


def _launch(args, workdir, cache, *, num_processes):
  """Runs the entry point through launch/local.py.

  Returns the launcher's stdout and each process's log.
  """
  log_dir = workdir + "_logs"
  cmd = [
      sys.executable, os.path.join(REPO, "launch", "local.py"),
      f"--num_processes={num_processes}",
      f"--log_dir={log_dir}", "--", f"--workdir={workdir}", *args,
      *narrow_model_flags(),
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(cache), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  logs = [open(os.path.join(log_dir, f"process_{i}.log")).read()
          for i in range(num_processes)]
  return proc.stdout, logs


def _files(folder):
  """{relative path: bytes} of every file under folder."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def _train_eval_then_eval_alone(tmp_path, cache, args):
  """2-process train_eval, then 1 process evaluating the same checkpoint.

  The training itself differs between 1 and 2 processes (each process
  shuffles its own data shard), so the 1-process run (one CPU device)
  evaluates the checkpoint the 2-process run evaluated: the same weights
  through both evaluation paths, which must agree bit for bit.
  """
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  stdout, logs = _launch([*args, "--mode=train_eval",
                          "--config.total_steps=2"], two, cache,
                         num_processes=2)
  # The launcher started a 2-process job and echoes process 0.
  assert "Process 0 of 2; 1 local / 2 global devices" in logs[0]
  assert "Process 1 of 2; 1 local / 2 global devices" in logs[1]
  assert "Process 0 of 2" in stdout
  names = os.listdir(os.path.join(two, "checkpoints"))
  assert sorted(n for n in names if n.isdigit()) == ["2"]
  assert len(glob.glob(os.path.join(two, "events.out.tfevents.*"))) == 1
  shutil.copytree(os.path.join(two, "checkpoints"),
                  os.path.join(one, "checkpoints"))
  _launch([*args, "--mode=eval", "--config.total_steps=2"], one, cache,
          num_processes=1)
  return two, one


def test_two_process_panoptic_eval_equals_one_process(
    tmp_path, tmp_path_factory, data_dir):
  # 3 of the 4 val images in global batches of 2: one batch is half
  # padding, which sits in process 1's rows.
  args = ["--config=configs/synthetic.py:tiny",
          f"--config.input.data_dir={data_dir}",
          "--config.log_training_steps=1",
          "--config.evals.panoptic.batch_size=2",
          "--config.evals.panoptic.max_examples=3",
          "--config.evals.panoptic.num_overlays=2"]
  two, one = _train_eval_then_eval_alone(
      tmp_path, shared_cache_dir(tmp_path_factory), args)
  pred = os.path.join("predictions", "panoptic_step2")
  with open(os.path.join(two, pred, "panoptic.json")) as f:
    written = json.load(f)
  from configs import synthetic
  from pix2seq_d_jax.data import synthetic as synthetic_data

  root = synthetic_data.ensure_synthetic(  # The cached split, as generated.
      data_dir, **synthetic.get_config("tiny").input.synthetic)
  gt_json = os.path.join(root, "annotations", "panoptic_val2017.json")
  with open(gt_json) as f:
    gt_ids = [a["image_id"] for a in json.load(f)["annotations"]][:3]
  # Every evaluated image once, in split order, from both processes.
  assert [a["image_id"] for a in written["annotations"]] == gt_ids
  assert [im["id"] for im in written["images"]] == gt_ids
  files_two, files_one = (_files(os.path.join(w, pred)) for w in (two, one))
  assert len(files_two) == 5  # panoptic.json, metrics.json, 3 PNGs.
  # The same bytes: PNGs, panoptic.json and the metrics (PQ) written once.
  # (Exact on this step-2 checkpoint; a longer-trained one can flip a pixel
  # whose top two ids nearly tie, as the batch shape per process differs.)
  assert files_two == files_one
  with open(os.path.join(two, pred, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["num_images"] == 3 and 0.0 <= metrics["All"]["pq"] <= 1.0
  overlays = [_files(os.path.join(w, "overlays", "panoptic_step2"))
              for w in (two, one)]
  assert overlays[0] == overlays[1] and len(overlays[0]) == 2
  # The logged metrics of the 2-process run are the same numbers.
  with open(os.path.join(two, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  # One record per logged step: process 1 wrote none.
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  logged = [r for r in rows if "eval/panoptic/pq" in r]
  assert len(logged) == 1 and logged[0]["step"] == 2
  assert logged[0]["eval/panoptic/pq"] == metrics["All"]["pq"]
  assert logged[0]["eval/panoptic/num_images"] == 3


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
  """(data_dir, val sequence names) of `video,tiny` with 3 val sequences."""
  from configs import synthetic
  from pix2seq_d_jax import data

  root = str(tmp_path_factory.mktemp("video_data"))
  config = synthetic.get_config("video,tiny")
  params = dict(config.input.synthetic_video, num_val=3)
  source = data.get_source("synthetic_video", data_dir=root, split="val",
                           **params)
  return root, list(source.sequence_names)


def test_two_process_davis_eval_equals_one_process(
    tmp_path, tmp_path_factory, video_data):
  # 3 val sequences in global batches of 2 (one sequence per process): the
  # second batch's process-1 row is padding.
  data_dir, names = video_data
  args = ["--config=configs/synthetic.py:video,tiny",
          f"--config.input.data_dir={data_dir}",
          "--config.input.synthetic_video.num_val=3"]
  two, one = _train_eval_then_eval_alone(
      tmp_path, shared_cache_dir(tmp_path_factory), args)
  pred = os.path.join("predictions", "davis_step2")
  files_two, files_one = (_files(os.path.join(w, pred)) for w in (two, one))
  # The results folder (palette PNGs of 3 sequences x 4 frames) and the
  # metrics written by process 0 are byte for byte the 1-process ones.
  assert len(files_two) == 3 * 4 + 1
  assert sorted({p.split(os.sep)[0] for p in files_two if os.sep in p}) == (
      sorted(names))
  assert files_two == files_one
  metrics = json.loads(files_two["metrics.json"])
  assert metrics["num_sequences"] == 3
  assert metrics["num_objects"] == len(metrics["per_sequence"]) > 0
