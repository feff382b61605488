"""The training loop in-process: no per-step host sync, NaN at step k.

`train.train_and_evaluate` runs the narrow tiny model for a few steps on one
CPU device. Every device-to-host read of the loop goes through
`train._fetch`; the tests count those reads and forbid implicit transfers
(`jax.transfer_guard_device_to_host("disallow")`), so a stray `float(x)` or
`bool(x)` on a device value inside the loop fails.
"""

import contextlib
import json
import threading

import jax
import numpy as np
import pytest

from configs import synthetic
from pix2seq_d_jax import host_memory, train
from pix2seq_d_jax.data import pipeline
from tests import late_transfer
from tests.multiprocess_worker import NARROW_MODEL


def _config(data_dir, total_steps, log_every, ckpt_every):
  config = synthetic.get_config("tiny")
  config.model.update(NARROW_MODEL)
  config.input.data_dir = str(data_dir)
  config.total_steps = total_steps
  config.log_training_steps = log_every
  config.ckpt_steps = ckpt_every
  return config


@pytest.fixture
def fetches(monkeypatch):
  """The steps at which the loop read device values (via `_fetch`)."""
  calls = []
  real = train._fetch

  def counting(tree):
    calls.append(tree)
    return real(tree)

  monkeypatch.setattr(train, "_fetch", counting)
  return calls


def test_device_values_are_read_only_at_log_and_checkpoint_steps(
    tmp_path, fetches, monkeypatch, allocator_changes):
  # 7 steps, log at 1 (first), 3, 6 and 7 (last); checkpoint at 7: one
  # read for the resume step, then one per log step, none in between.
  config = _config(tmp_path / "data", total_steps=7, log_every=3,
                   ckpt_every=100)
  managers = []  # make_manager's keyword arguments.
  real_manager = train.checkpointing.make_manager
  monkeypatch.setattr(
      train.checkpointing, "make_manager",
      lambda *a, **k: managers.append(k) or real_manager(*a, **k))
  reserves = []
  real_reserve = train._temporaries_reserve
  monkeypatch.setattr(
      train, "_temporaries_reserve",
      lambda *a: reserves.append(real_reserve(*a)) or reserves[-1])
  # (why, device reads so far, whether the reserve held the step's
  # temporaries) of each heap release.
  released = []
  monkeypatch.setattr(
      train.host_memory, "release_free_heap",
      lambda why="": released.append(
          (why, len(fetches), bool(reserves) and reserves[0].holds_block))
      or 0)
  with jax.transfer_guard_device_to_host("disallow"):
    train.train_and_evaluate(config, str(tmp_path / "w"), mode="train")
  assert len(fetches) == 1 + 4
  # Freed heap goes back after the compile and the initialisation (the
  # resume-step read), before the first step's log read; then before and
  # after the final checkpoint's write (the write's buffers come from other
  # threads' heaps, so it would stack on this heap's free pages), while the
  # reserve held the temporaries.
  assert released == [("after the compile and the initialisation", 1, False),
                      ("before the checkpoint of step 7", 5, True),
                      ("after the checkpoint of step 7", 5, True)]
  assert reserves[0].temp_bytes > 0 and not reserves[0].holds_block
  # The checkpoint's write buffers share the host with the step: capped.
  assert managers[0]["save_concurrent_bytes"] == 100 * 10**6
  # Then the step's temporaries stay mapped (conftest records, not applies).
  assert allocator_changes == ["keep_freed_heap"]
  logged = [int(np.asarray(f["tracker"]["count"])) for f in fetches[1:]
            if isinstance(f, dict) and "tracker" in f]
  # Steps accumulated between reads: 1, 2 (steps 2-3), 3 (4-6), 1 (7).
  assert logged == [1, 2, 3, 1]


class _PoisonedLoader:
  """The real training loader, with NaN loss weights in one batch."""

  def __init__(self, inner, poisoned_batch):
    self.inner, self.poisoned, self.count = inner, poisoned_batch, 0

  def __next__(self):
    batch = next(self.inner)
    self.count += 1
    if self.count == self.poisoned:
      batch = dict(batch, loss_weight=np.full_like(batch["loss_weight"],
                                                   np.nan))
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def test_nan_at_step_k_stops_the_run_naming_step_k(tmp_path, monkeypatch):
  # The NaN happens at step 2 but is read at the next log step (4): the
  # message names step 2, and no checkpoint holds the broken state.
  real = pipeline.make_train_loader
  monkeypatch.setattr(
      train.pipeline, "make_train_loader",
      lambda *a, **k: _PoisonedLoader(real(*a, **k), poisoned_batch=2))
  config = _config(tmp_path / "data", total_steps=6, log_every=4,
                   ckpt_every=4)
  config.evals = {}
  workdir = tmp_path / "w"
  with pytest.raises(train.NonFiniteLossError,
                     match=r"not finite at step 2;.*checkpoint: none"):
    train.train_and_evaluate(config, str(workdir), mode="train")
  assert not list((workdir / "checkpoints").glob("[0-9]*"))
  # The lock was released on the way out: the workdir can be used again.
  assert not (workdir / "lock").exists()


def test_logged_norms_are_those_of_the_checkpointed_parameters(tmp_path):
  # The parameter and update norms are computed at log steps only, from a
  # copy of the parameters taken before the step: at steps 2 and 3 they
  # equal the norms of the checkpointed parameters and of their difference.
  import json

  import optax

  from pix2seq_d_jax import checkpointing, experiment

  config = _config(tmp_path / "data", total_steps=3, log_every=1,
                   ckpt_every=1)
  config.keep_ckpt = 3
  config.evals = {}
  workdir = tmp_path / "w"
  train.train_and_evaluate(config, str(workdir), mode="train")
  with open(workdir / "metrics.jsonl") as f:
    rows = {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}
  exp = experiment.create(config, total_steps=3)
  manager = checkpointing.make_manager(str(workdir), keep=3)
  try:
    params = {s: checkpointing.restore(manager, s, exp.abstract_state)[0]
              .params for s in (1, 2, 3)}
  finally:
    manager.close()
  for step in (2, 3):
    diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b,
                        params[step], params[step - 1])
    np.testing.assert_allclose(rows[step]["train/update_norm"],
                               float(optax.tree.norm(diff)), rtol=1e-4)
    np.testing.assert_allclose(rows[step]["train/param_norm"],
                               float(optax.tree.norm(params[step])),
                               rtol=1e-5)
  assert rows[3]["train/update_norm"] > 0


def test_a_resumed_run_compiles_the_step_while_restoring(tmp_path,
                                                          monkeypatch):
  config = _config(tmp_path / "data", total_steps=2, log_every=1,
                   ckpt_every=2)
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(config, workdir, mode="train")

  compiling, order = threading.Event(), []
  real_compile = train.experiment.Experiment.compile_train_step
  real_restore = train.checkpointing.restore

  def compile_train_step(exp, *args, **kwargs):
    order.append("compile")
    compiling.set()
    return real_compile(exp, *args, **kwargs)

  def restore(*args, **kwargs):
    # Sequential code would compile only after this returns: the wait then
    # times out and the order below shows it.
    compiling.wait(timeout=30)
    order.append("restore")
    return real_restore(*args, **kwargs)

  monkeypatch.setattr(train.experiment.Experiment, "compile_train_step",
                      compile_train_step)
  monkeypatch.setattr(train.checkpointing, "restore", restore)
  config.total_steps = 3
  train.train_and_evaluate(config, workdir, mode="train")
  assert order == ["compile", "restore"]
  steps = [json.loads(line).get("step") for line in
           (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert max(s for s in steps if s is not None) == 3


def test_a_fresh_start_initialises_after_lowering_beside_the_compile(
    tmp_path, monkeypatch):
  # Both traces hold the GIL, so the state's initialisation starts once the
  # step is lowered; the step's compile then runs beside it.
  config = _config(tmp_path / "data", total_steps=1, log_every=1,
                   ckpt_every=100)
  config.evals = {}
  initialising, order = threading.Event(), []
  real_lower = train.experiment.Experiment.lower_train_step
  real_init = train.experiment.Experiment.init_state

  class Lowered:
    def __init__(self, lowered):
      self._lowered = lowered

    def compile(self):
      # Compiled before the initialisation starts, the wait times out and
      # the order below shows it.
      initialising.wait(timeout=30)
      order.append("compile")
      return self._lowered.compile()

  def lower_train_step(exp, *args, **kwargs):
    lowered = real_lower(exp, *args, **kwargs)
    order.append("lowered")
    return Lowered(lowered)

  def init_state(exp, *args, **kwargs):
    order.append("init")
    initialising.set()
    return real_init(exp, *args, **kwargs)

  monkeypatch.setattr(train.experiment.Experiment, "lower_train_step",
                      lower_train_step)
  monkeypatch.setattr(train.experiment.Experiment, "init_state", init_state)
  train.train_and_evaluate(config, str(tmp_path / "w"), mode="train")
  assert order == ["lowered", "init", "compile"]


def test_nothing_compiles_between_train_steps(tmp_path, monkeypatch):
  # The loop's helpers (parameter copy and norms, metric tracker) compile
  # before the first step: compiled between the first two, their allocations
  # would be cut from the block the first step's temporaries freed, and the
  # second step would grow the heap by its temporaries (host_memory).
  config = _config(tmp_path / "data", total_steps=3, log_every=1,
                   ckpt_every=100)
  config.evals = {}
  steps_entered, compiles = [], []
  real_reserve = train._temporaries_reserve

  class CountingReserve(host_memory.TemporariesReserve):
    @contextlib.contextmanager
    def step(self):
      steps_entered.append(len(compiles))
      with super().step():
        yield

  monkeypatch.setattr(
      train, "_temporaries_reserve",
      lambda *a: CountingReserve(real_reserve(*a).temp_bytes))

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    train.train_and_evaluate(config, str(tmp_path / "w"), mode="train")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(steps_entered) == 3
  # Programs compiled before each step: none after the first.
  assert steps_entered[1:] == [steps_entered[0]] * 2, compiles[
      steps_entered[0]:]


def test_one_cpu_steps_get_ready_inputs(tmp_path, monkeypatch):
  # jax's CPU client runs a computation on the calling thread (where the
  # step's temporaries come from the kept main heap) only if its inputs are
  # ready; the batch's copy to the device often is not, right after it is
  # made. `sharding.global_batch` waits for it on CPU.
  from pix2seq_d_jax import experiment

  readiness = []
  real_compile = experiment.Experiment.compile_train_step

  def compile_train_step(self, *args, **kwargs):
    compiled = real_compile(self, *args, **kwargs)

    def step(state, batch, rng):
      readiness.append(all(x.is_ready() for x in jax.tree.leaves(batch)))
      return compiled(state, batch, rng)

    return step

  monkeypatch.setattr(experiment.Experiment, "compile_train_step",
                      compile_train_step)
  late_transfer.make_transfers_late(monkeypatch)
  monkeypatch.setattr(train, "_compile_loop_helpers",
                      lambda compiled, norms_fn, state: None)
  config = _config(tmp_path / "data", total_steps=6, log_every=100,
                   ckpt_every=100)
  config.evals = {}
  train.train_and_evaluate(config, str(tmp_path / "w"), mode="train")
  assert readiness == [True] * 6
