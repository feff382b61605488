"""A run killed with SIGKILL and rerun ends exactly where an unkilled run does.

The real entry point trains the tiny synthetic config for 10 steps with a
checkpoint every 2. One run is killed (SIGKILL: no handler, no final save)
at a seeded random step and then rerun with the same command; it must reach
bitwise the same final state, and log bitwise the same losses, as a run that
was never interrupted. A save killed midway leaves a
`<step>.orbax-checkpoint-tmp` folder: restore must ignore it (the previous
step loads) and the next start must remove it.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import synthetic
from pix2seq_d_jax import checkpointing, experiment, sharding
from pix2seq_d_jax.data import synthetic as synthetic_data
from tests.multiprocess_worker import (
    NARROW_MODEL,
    narrow_model_flags,
    shared_cache_dir,
)

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL, CKPT_EVERY, SEED = 10, 2, 0


def _config():
  config = synthetic.get_config("tiny")
  config.model.update(NARROW_MODEL)
  config.total_steps = TOTAL
  return config


def _cmd(workdir, data_dir):
  return [
      sys.executable, "-m", "pix2seq_d_jax.main",
      "--config=configs/synthetic.py:tiny", f"--workdir={workdir}",
      f"--config.input.data_dir={data_dir}", f"--config.total_steps={TOTAL}",
      f"--config.ckpt_steps={CKPT_EVERY}", "--config.log_training_steps=1",
      "--mode=train", *narrow_model_flags(),
  ]


def _metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    # A SIGKILL may cut the last line short.
    return [json.loads(line) for line in f if line.endswith("\n")]


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                        "checkpoints"))
                if n.isdigit())


def _restore(workdir, step):
  config = _config()
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  abstract = experiment.create(config, mesh, total_steps=TOTAL).abstract_state
  manager = checkpointing.make_manager(workdir, keep=config.keep_ckpt)
  try:
    assert manager.latest_step() == step
    state, data_state = checkpointing.restore(manager, step, abstract)
  finally:
    manager.close()
  return jax.tree.map(np.asarray, state), data_state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("fault")
  data_dir = str(root / "data")
  synthetic_data.ensure_synthetic(data_dir, **_config().input.synthetic)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=shared_cache_dir(tmp_path_factory),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  killed, reference = str(root / "killed"), str(root / "reference")
  kill_at = random.Random(SEED).randint(3, TOTAL - 4)

  def start(workdir, log_name):
    # Output to a file: an undrained pipe could fill up and block the run.
    with open(root / log_name, "w") as log:
      return subprocess.Popen(_cmd(workdir, data_dir), cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT)

  def tail(log_name):
    return (root / log_name).read_text()[-4000:]

  # The first run compiles (and fills the cache); it is killed as soon as
  # metrics.jsonl shows step `kill_at`.
  proc = start(killed, "killed.log")
  deadline = time.time() + 600
  while not any(r["step"] >= kill_at for r in _metrics(killed)):
    assert proc.poll() is None, tail("killed.log")
    assert time.time() < deadline, "no progress before the kill deadline"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  at_kill = dict(
      returncode=proc.returncode,
      logged=[r["step"] for r in _metrics(killed)],
      finalized=_steps(killed),
  )
  # The rerun and the uninterrupted run, side by side (both hit the cache).
  procs = {"rerun.log": start(killed, "rerun.log"),
           "reference.log": start(reference, "reference.log")}
  for log_name, p in procs.items():
    assert p.wait(timeout=600) == 0, tail(log_name)
  return dict(kill_at=kill_at, at_kill=at_kill, killed=killed,
              reference=reference)


def test_sigkill_then_rerun_equals_uninterrupted_run(runs):
  at_kill = runs["at_kill"]
  assert at_kill["returncode"] == -signal.SIGKILL
  assert runs["kill_at"] <= max(at_kill["logged"]) < TOTAL  # Killed midway.
  resumed_from = max(at_kill["finalized"], default=0)
  assert resumed_from % CKPT_EVERY == 0 and resumed_from < TOTAL
  # The rerun continued from the last finalized checkpoint, step by step,
  # and cut the log back to it: exactly one row per logged step, although
  # the killed run had logged past the checkpoint.
  killed_rows, ref_rows = _metrics(runs["killed"]), _metrics(runs["reference"])
  assert max(at_kill["logged"]) > resumed_from
  assert [r["step"] for r in killed_rows] == list(range(1, TOTAL + 1))
  assert [r["step"] for r in ref_rows] == list(range(1, TOTAL + 1))
  # Bitwise the same losses at every step, before and after the kill.
  ref_loss = {r["step"]: r["train/loss"] for r in ref_rows}
  for r in killed_rows:
    assert r["train/loss"] == ref_loss[r["step"]], r["step"]
  # Bitwise the same final state (params, EMA, optimizer, batch stats) and
  # input-pipeline position.
  final, data_final = _restore(runs["killed"], TOTAL)
  ref, data_ref = _restore(runs["reference"], TOTAL)
  assert int(final.step) == TOTAL
  assert data_final == data_ref
  leaves, ref_leaves = jax.tree.leaves(final), jax.tree.leaves(ref)
  assert len(leaves) == len(ref_leaves) > 10
  for a, b in zip(leaves, ref_leaves, strict=True):
    assert np.array_equal(a, b)
  # Leftovers of a save the kill interrupted were removed by the rerun.
  assert not [n for n in os.listdir(os.path.join(runs["killed"],
                                                 "checkpoints"))
              if ".orbax-checkpoint-tmp" in n]


def test_interrupted_save_restores_previous_step(runs, tmp_path):
  src = os.path.join(runs["reference"], "checkpoints")
  ckpts = tmp_path / "w" / "checkpoints"
  shutil.copytree(src, ckpts)
  # What a SIGKILL during the save of step TOTAL + 2 leaves: an unfinalized
  # temporary folder with part of the files.
  partial = ckpts / f"{TOTAL + 2}.orbax-checkpoint-tmp"
  shutil.copytree(ckpts / str(TOTAL), partial)
  for name in ("_CHECKPOINT_METADATA", "commit_success.txt"):
    os.remove(partial / name)
  os.remove(partial / "state" / "manifest.ocdbt")
  state, _ = _restore(str(tmp_path / "w"), TOTAL)
  ref, _ = _restore(runs["reference"], TOTAL)
  assert int(state.step) == TOTAL
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref), strict=True):
    assert np.array_equal(a, b)
  assert not partial.exists()  # cleanup_tmp_directories at manager start.
