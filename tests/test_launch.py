"""The launch scripts' --dry_run output is the exact command they would run."""

import os
import subprocess

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
