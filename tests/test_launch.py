"""The launch scripts' --dry_run output is the exact command they would run.

`launch/local.py` is also run for real on stand-in commands: one failing
process stops the others (SIGKILL after the grace period if SIGTERM is
ignored) and sets the exit status; logs land in `process_<i>.log`.
"""

import importlib.util
import os
import shlex
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args):
  return subprocess.run(
      ["bash", os.path.join(REPO, "launch", script), *args],
      capture_output=True, text=True, check=False)


def test_tpu_pod_runs_same_command_on_all_workers():
  out = _dry("tpu_pod.sh", "--tpu=p2sd", "--zone=us-central2-b", "--setup",
             "--dry_run", "--", "--config=configs/coco.py",
             "--workdir=gs://b/run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3  # scp, install, run.
  assert lines[0].startswith("gcloud compute tpus tpu-vm scp")
  assert "pip\\ install\\ -e\\ \\'.\\[tpu\\]\\'" in lines[1]
  run = lines[2]
  assert "--worker=all" in run and "--zone=us-central2-b" in run
  assert "pix2seq_d_jax.main\\ --distributed\\ --config=configs/coco.py" in run
  assert "--workdir=gs://b/run" in run


def test_tpu_pod_requires_name_and_zone():
  out = _dry("tpu_pod.sh", "--dry_run")
  assert out.returncode == 2 and "--tpu=NAME" in out.stderr


def test_slurm_script_one_task_per_gpu():
  out = _dry("slurm.sh", "--nodes=2", "--gpus_per_node=4",
             "--partition=gpu", "--dry_run", "--", "--config=configs/coco.py",
             "--workdir=/w")
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert "#SBATCH --nodes=2" in text
  assert "#SBATCH --ntasks-per-node=4" in text
  assert "#SBATCH --partition=gpu" in text
  assert ("srun --kill-on-bad-exit=1 python -m pix2seq_d_jax.main "
          "--distributed --config=configs/coco.py --workdir=/w") in text
  assert _dry("slurm.sh", "--bogus").returncode == 2


def test_tpu_pod_passes_bucket_workdir_and_data_dir():
  out = _dry("tpu_pod.sh", "--tpu=p2sd", "--zone=z", "--dry_run", "--",
             "--workdir=gs://b/run", "--config.input.data_dir=gs://b/coco")
  assert out.returncode == 0, out.stderr
  (run,) = out.stdout.strip().splitlines()
  assert ("--distributed\\ --workdir=gs://b/run\\ "
          "--config.input.data_dir=gs://b/coco") in run


@pytest.mark.parametrize("args, message", [
    (["--workdir=/tmp/run"], "--workdir must be a gs:// URL"),
    (["--workdir=gs://b/run", "--config.input.data_dir=/data/coco"],
     "--config.input.data_dir must be a gs:// URL"),
    (["--config=configs/coco.py"], "pass --workdir=gs://"),
])
def test_tpu_pod_refuses_local_paths(args, message):
  out = _dry("tpu_pod.sh", "--tpu=p2sd", "--zone=z", "--dry_run", "--", *args)
  assert out.returncode == 2 and message in out.stderr
  assert not out.stdout


def test_slurm_checks_the_workdir_is_shared_before_training():
  out = _dry("slurm.sh", "--nodes=2", "--dry_run", "--",
             "--workdir=/shared/run", "--config.input.data_dir=/shared/coco")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  marker = "/shared/run/.shared_check_${SLURM_JOB_ID}"
  mkdir = lines.index(f"mkdir -p /shared/run && touch {marker}")
  check = lines[mkdir + 1]
  assert check.startswith("srun --ntasks-per-node=1 bash -c")
  assert f"test -e {marker}" in check
  train = next(i for i, line in enumerate(lines)
               if "pix2seq_d_jax.main --distributed" in line)
  assert mkdir < train and lines[train - 1] == f"rm -f {marker}"
  assert lines[train].endswith(
      "--workdir=/shared/run --config.input.data_dir=/shared/coco")


def test_slurm_bucket_workdir_needs_no_shared_check():
  out = _dry("slurm.sh", "--dry_run", "--", "--workdir=gs://b/run")
  assert out.returncode == 0, out.stderr
  assert "shared_check" not in out.stdout
  assert "--distributed --workdir=gs://b/run" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--workdir=runs/a"], "--workdir must be an absolute path"),
    (["--workdir=/s/a", "--config.input.data_dir=data"],
     "--config.input.data_dir must be an absolute path"),
    (["--config=configs/coco.py"], "pass --workdir="),
])
def test_slurm_refuses_relative_or_missing_paths(args, message):
  out = _dry("slurm.sh", "--dry_run", "--", *args)
  assert out.returncode == 2 and message in out.stderr


def _local_module():
  spec = importlib.util.spec_from_file_location(
      "launch_local", os.path.join(REPO, "launch", "local.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_local_dry_run_prints_one_command_per_process():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "local.py"),
       "--num_processes=3", "--port=12345", "--devices_per_process=4",
       "--dry_run", "--", "--config=configs/synthetic.py:tiny",
       "--workdir=/tmp/a b"],
      capture_output=True, text=True, check=False, env=env)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert words[:3] == ["cd", REPO, "&&"]
    assert words[3:5] == [
        "JAX_PLATFORMS=cpu",
        "XLA_FLAGS=--xla_force_host_platform_device_count=4"]
    assert words[5:] == [
        sys.executable, "-m", "pix2seq_d_jax.main", "--distributed",
        "--coordinator_address=127.0.0.1:12345", "--num_processes=3",
        f"--process_id={i}", "--config=configs/synthetic.py:tiny",
        "--workdir=/tmp/a b"]


def test_local_dry_run_one_device_sets_no_xla_flags():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "local.py"),
       "--num_processes=2", "--dry_run", "--", "--workdir=/w"],
      capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2 and "XLA_FLAGS" not in out.stdout
  # A free port was picked, the same for both processes.
  ports = {w.split(":")[-1] for line in lines for w in shlex.split(line)
           if w.startswith("--coordinator_address=")}
  assert len(ports) == 1 and 0 < int(ports.pop()) < 65536


@pytest.mark.parametrize("args,message", [
    (["--num_processes=0", "--", "--workdir=/w"], "--num_processes=0"),
    (["--num_processes=2", "--devices_per_process=0", "--", "--workdir=/w"],
     "--devices_per_process=0"),
    (["--num_processes=2"], "flags after --"),
    (["--num_processes=2", "--port=70000", "--", "--workdir=/w"],
     "--port=70000"),
])
def test_local_bad_arguments_exit_2(args, message):
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "local.py"), *args],
      capture_output=True, text=True, check=False)
  assert out.returncode == 2
  assert message in out.stderr and "Traceback" not in out.stderr


def test_local_failure_stops_the_others_and_returns_its_status(
    tmp_path, monkeypatch):
  local = _local_module()
  # Process 0 ignores SIGTERM (as a process stuck in a collective may) and
  # would run for a minute; process 1 fails at once.
  stubborn = ("import signal, time; signal.signal(signal.SIGTERM, "
              "signal.SIG_IGN); print('waiting', flush=True); time.sleep(60)")
  # Process 1 fails once process 0 is up (its log says so): on a busy
  # machine process 0 could otherwise be killed before printing anything.
  failing = (
      "import pathlib, sys, time\n"
      f"log = pathlib.Path({str(tmp_path / 'process_0.log')!r})\n"
      "deadline = time.time() + 20\n"
      "while time.time() < deadline and 'waiting' not in (\n"
      "    log.read_text() if log.exists() else ''):\n"
      "  time.sleep(0.05)\n"
      "print('failing')\n"
      "sys.exit(3)\n")
  monkeypatch.setattr(local, "commands", lambda n, port, main_args: [
      [sys.executable, "-c", stubborn], [sys.executable, "-c", failing]])
  t0 = time.time()
  status = local.main(["--num_processes=2", f"--log_dir={tmp_path}",
                       "--kill_grace_secs=1", "--", "--workdir=/w"])
  assert status == 3
  assert time.time() - t0 < 30  # Killed, not waited for.
  assert (tmp_path / "process_0.log").read_text() == "waiting\n"
  assert (tmp_path / "process_1.log").read_text() == "failing\n"


def test_local_all_succeed_returns_0(tmp_path, monkeypatch):
  local = _local_module()
  monkeypatch.setattr(local, "commands", lambda n, port, main_args: [
      [sys.executable, "-c", f"print('process {i}')"] for i in range(n)])
  status = local.main(["--num_processes=3", f"--log_dir={tmp_path}", "--",
                       "--workdir=/w"])
  assert status == 0
  for i in range(3):
    assert (tmp_path / f"process_{i}.log").read_text() == f"process {i}\n"


@pytest.mark.parametrize("args,message", [
    (["--num_processes=2", "--process_id=0"],
     "--num_processes/--process_id need --distributed"),
    (["--distributed", "--num_processes=0"], "--num_processes=0"),
    (["--distributed", "--num_processes=2", "--process_id=2"],
     "--process_id=2"),
    (["--distributed", "--coordinator_address=localhost"],
     "--coordinator_address='localhost': expected host:port"),
])
def test_main_bad_distributed_flags_exit_2(tmp_path, args, message):
  out = subprocess.run(
      [sys.executable, "-m", "pix2seq_d_jax.main",
       f"--workdir={tmp_path}", *args],
      capture_output=True, text=True, check=False, cwd=REPO)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1]
  assert "Traceback" not in out.stderr
