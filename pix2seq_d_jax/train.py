"""`train_and_evaluate(config, workdir)`: the training loop, top to bottom.

Sections: workdir and lock, mesh, data, model/state/step (all from
`experiment.create`), checkpoint (resume), evaluators, loop. Every process
runs the same code; only process 0 writes summaries, predictions and
overlays (orbax coordinates checkpoints).

The loop is asynchronous: each step is dispatched and the host goes on to
read the next batch while the device computes. Device values reach the host
only at log, checkpoint and evaluation steps (`_fetch`); the step records
the first step whose loss was not finite, so a NaN at step k stops the run
naming step k although it is seen later. On CPU with more than one device
every step is blocked on, because queued steps with collectives deadlock
there; on TPU and GPU, and on one CPU device, nothing blocks.

SIGTERM or SIGINT (preemption, Ctrl-C) saves a checkpoint at the current
step and returns normally; rerunning the same command resumes from it. With
several processes, SIGTERM is jax's preemption notice
(`multihost_utils.reached_preemption_sync_point`: all hosts stop after the
same step) and a Ctrl-C is combined over processes at log steps.

A failure never costs the training: every exit path waits for pending
checkpoint writes, and the final checkpoint is complete before the final
evaluation starts.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from pix2seq_d_jax import (
    checkpointing,
    config_lib,
    evaluators,
    experiment,
    host_memory,
    reporting,
    sharding,
    train_state,
    workdir_lock,
)
from pix2seq_d_jax.data import pipeline
from pix2seq_d_jax.formats import atomic
from pix2seq_d_jax.models import weight_import

MODES = ("train", "eval", "train_eval")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss."""


def _fetch(tree: Any) -> Any:
  """Device values to the host: the loop's only device-to-host reads."""
  return jax.device_get(tree)


# ---------------------------------------------------------------- metrics


def empty_tracker() -> dict[str, jax.Array]:
  """Zeroed on-device accumulators of the loop's metrics."""
  return {
      "loss_sum": jnp.zeros((), jnp.float32),
      "skipped": jnp.zeros((), jnp.float32),
      "count": jnp.zeros((), jnp.int32),
      "first_nonfinite_step": jnp.zeros((), jnp.int32),
  }


@jax.jit
def track_metrics(tracker: dict, metrics: dict, step: jax.Array) -> dict:
  """Accumulates a step's metrics on device (no host sync).

  `step` is the state's step after the update (1-based step number). A
  non-finite loss of an applied update is remembered by its step; a skipped
  update (`skip_nonfinite_updates`) only counts as skipped.
  """
  loss = metrics["loss"]
  bad = ~jnp.isfinite(loss) & (metrics["skipped"] == 0)
  first = tracker["first_nonfinite_step"]
  return {
      "loss_sum": tracker["loss_sum"] + jnp.where(
          jnp.isfinite(loss), loss, 0.0),
      "skipped": tracker["skipped"] + metrics["skipped"],
      "count": tracker["count"] + 1,
      "first_nonfinite_step": jnp.where(
          (first == 0) & bad, step.astype(jnp.int32), first),
  }


def _compile_loop_helpers(compiled: Any, norms_fn: Callable[..., Any],
                          state: train_state.TrainState) -> None:
  """Compiles what the loop runs between steps, before the first step.

  The metric tracker, called once on zeros shaped and sharded as the
  step's metrics, and the log steps' norms (`norms_fn`), called once on
  the state itself (sharded as the step's output; zeros of the parameters
  and the optimizer state would add 1 GiB at 256 / 128 to the start-up's
  peak), before the heap is released: nothing compiles between steps.
  Compiled between the first two steps, they paused the second, and
  where the loop keeps the heap their allocations were cut from the block
  the first step's temporaries had freed (before
  `host_memory.TemporariesReserve` held it): measured on the paper model
  at 256 / 128 on one CPU, the second step took 7.0 s instead of 3.3 s
  and left the process 2.3 GiB larger for the rest of the run (7.7
  instead of 5.4 GB). Even with the block held, the executables
  they keep would sit above it in the heap.
  """
  t0 = time.time()
  state_info, metrics_info = compiled.out_info

  def zeros(info: jax.ShapeDtypeStruct) -> jax.Array:
    def shard(index: tuple[slice, ...]) -> np.ndarray:
      shape = [len(range(*part.indices(size)))
               for part, size in zip(index, info.shape, strict=True)]
      return np.zeros(shape, info.dtype)
    return jax.make_array_from_callback(info.shape, info.sharding, shard)

  norms = norms_fn(state.params, state.opt_state,
                   zeros(metrics_info["skipped"]))
  tracker = track_metrics(empty_tracker(), jax.tree.map(zeros, metrics_info),
                          zeros(state_info.step))
  jax.block_until_ready((norms, tracker))
  logging.info("Compiled the loop's metric and norm helpers in %.1fs.",
               time.time() - t0)


def _blocks_every_step(mesh: Any) -> bool:
  """Whether steps must be blocked on one by one (CPU collectives)."""
  return jax.devices()[0].platform == "cpu" and mesh.size > 1


# -------------------------------------------------------------- stopping


class _StopSignal:
  """Turns SIGTERM/SIGINT into a stop at a step every process agrees on.

  One process: a flag set by the handler, checked after each step. Several
  processes: SIGTERM is left to jax's preemption service, which makes every
  host stop after the same step (`reached_preemption_sync_point`, checked
  each step without a collective); a Ctrl-C flag is combined over processes
  only at log steps, where all processes are at the same step anyway.
  """

  def __init__(self):
    self.received: int | None = None
    self._previous = {}
    self._multi = jax.process_count() > 1
    self._preemption = False

  def __enter__(self):
    sigs = [signal.SIGINT] if self._multi else [signal.SIGTERM, signal.SIGINT]
    for sig in sigs:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. a notebook worker).
        pass
    return self

  def should_stop(self, step: int, *, at_sync_step: bool) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    if not self._multi:
      return self.received is not None
    if _reached_preemption(step):
      self._preemption = True
      logging.warning("Preemption notice: checkpointing and stopping.")
      return True
    if not at_sync_step:
      return False
    flags = multihost_utils.process_allgather(
        np.int32(self.received is not None))
    return bool(np.asarray(flags).any())

  @property
  def stopped(self) -> bool:
    return self.received is not None or self._preemption

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: stop now.
    self.received = signum
    logging.warning("Signal %d: checkpointing and stopping.", signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _reached_preemption(step: int) -> bool:
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # No preemption service (disabled by the user).
    return False


# ------------------------------------------------------------------ loop


def resolve_workdir(workdir: str) -> str:
  """An absolute local path, or a URL (`gs://...`) kept as it is.

  Raises:
    ValueError: an empty workdir (e.g. an unset shell variable), which
      would otherwise write into the current directory.
  """
  if not workdir or not str(workdir).strip():
    raise ValueError(
        "--workdir is empty: give the run directory (an unset shell "
        "variable?)")
  workdir = str(workdir)
  if "://" in workdir:
    return workdir
  return os.path.abspath(os.path.expanduser(workdir))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, mode: str = "train_eval"
) -> dict[str, Any]:
  """Trains and/or evaluates; returns the last eval metrics (may be empty).

  Args:
    config: a validated-or-not config (it is validated here first).
    workdir: checkpoints, metrics and outputs go here; an existing workdir
      resumes. Local or a URL (`gs://bucket/run`).
    mode: `train`, `eval` (latest checkpoint) or `train_eval`.

  Raises:
    ValueError, ConfigError, FileNotFoundError: bad config, paths or data.
    workdir_lock.WorkdirLockedError: another run holds the workdir.
    NonFiniteLossError: a NaN/inf loss (the step is named).
  """
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
  config_lib.validate(config)
  workdir = resolve_workdir(workdir)
  logging.info(
      "Process %d of %d; %d local / %d global devices (%s).",
      jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count(), jax.devices()[0].platform,
  )
  lock = _acquire_lock(workdir)
  try:
    return _run(config, workdir, mode)
  finally:
    lock.release()


def _acquire_lock(workdir: str) -> workdir_lock.WorkdirLock:
  """Process 0 locks the workdir; every process fails if it could not."""
  lock = workdir_lock.WorkdirLock(workdir, is_lead=jax.process_index() == 0)
  error = None
  try:
    lock.acquire()
  except workdir_lock.WorkdirLockedError as e:
    error = e
  if jax.process_count() > 1:
    # The others must fail too, or they would wait in a collective forever.
    if multihost_utils.broadcast_one_to_all(np.int32(error is not None)):
      error = error or workdir_lock.WorkdirLockedError(
          f"workdir {workdir} is locked by another run (see process 0)")
  if error:
    raise error
  return lock


def _run(
    config: ml_collections.ConfigDict, workdir: str, mode: str
) -> dict[str, Any]:
  # ----------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  dp = sharding.data_parallel_size(mesh, config.sharding_rules)
  batch_size = config.input.batch_size
  if batch_size % dp or batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"config.input.batch_size={batch_size}: expected a multiple of the "
        f"{dp} data-parallel devices and {jax.process_count()} processes"
    )
  local_batch_size = batch_size // jax.process_count()

  # ----------------------------------------------------------------- data
  train_source = experiment.make_source(config, config.input.train_split)
  meta = train_source.metadata
  experiment.check_metadata(config, meta)

  # ------------------------------------- model, state and shardings, step
  exp = experiment.create(config, mesh, data_size=len(train_source))
  total_steps = exp.total_steps
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  reporting.log_parameters(
      exp.abstract_state.params,
      workdir if jax.process_index() == 0 else None)

  # ----------------------------------------------------------- checkpoint
  manager = checkpointing.make_manager(
      workdir, keep=config.keep_ckpt,
      # Its buffers are host memory beside the step's (`_save_checkpoint`).
      save_concurrent_bytes=(
          checkpointing.write_cap_bytes(exp.abstract_state)
          if _step_uses_main_heap(exp) else None))
  reporter = None
  try:
    latest = manager.latest_step()
    data_state, compiling, started_input = None, None, None
    if latest is not None:
      logging.info("Resuming from %s step %d.", workdir, latest)
      if mode != "eval":
        # The step compiles (or is read back from the caches) while the
        # checkpoint is read: a resumed start waits for the longer of the
        # two. The input needs the checkpoint's data state, so it starts
        # after the restore.
        compiling = _compile_in_background(exp)
      state, data_state = checkpointing.restore(
          manager, latest, exp.abstract_state)
    else:
      if mode == "eval" and not config.resume and not config.model_init:
        raise FileNotFoundError(
            f"--mode=eval: no checkpoint in {workdir}/checkpoints and "
            "neither config.resume nor config.model_init is set"
        )
      if mode != "eval":
        # A fresh start compiles the initialisation and the train step:
        # the step compiles in a thread meanwhile (XLA releases the GIL),
        # so the first step waits for the longer of the two, not their sum.
        # The input starts first: bad data fails before any compile.
        started_input = _start_input(config, train_source, local_batch_size,
                                     data_state=None)
        # Tracing is Python and holds the GIL: traced side by side, the
        # initialisation slows the step's lowering, the start of the
        # longer path, by 1.4-1.8x. So it is traced once the step is
        # lowered, and compiles beside the step's compile (docs/speed.md).
        lowered = threading.Event()
        compiling = _compile_in_background(exp, lowered)
        while not lowered.wait(timeout=1.0) and not compiling.done():
          pass  # A compile that failed before lowering is raised later.
      state = exp.init_state(init_rng)
      if config.resume:
        state = exp.restore_weights(config.resume)
      elif config.model_init:
        state = _init_weights(state, config.model_init, exp)
    start_step = int(_fetch(state.step))
    data_state = _own_data_state(data_state)

    reporter = reporting.Reporter(
        workdir, total_steps=total_steps,
        start_step=None if mode == "eval" else start_step)
    reporter.write_config(config.to_dict())
    return _train_loop(
        config, workdir, mode, exp=exp, meta=meta, manager=manager,
        reporter=reporter, state=state, data_state=data_state,
        latest=latest, start_step=start_step, train_source=train_source,
        local_batch_size=local_batch_size, train_rng=train_rng,
        compiling=compiling, started_input=started_input)
  finally:
    # Every exit path, exceptions included: finish (or fail) the pending
    # checkpoint writes before the interpreter tears down their threads.
    try:
      manager.wait_until_finished()
    finally:
      manager.close()
      if reporter is not None:
        reporter.close()


def _train_loop(
    config: ml_collections.ConfigDict, workdir: str, mode: str, *, exp: Any,
    meta: Any, manager: Any, reporter: reporting.Reporter, state: Any,
    data_state: Any, latest: int | None, start_step: int, train_source: Any,
    local_batch_size: int, train_rng: jax.Array,
    compiling: concurrent.futures.Future | None,
    started_input: tuple[Any, Any] | None,
) -> dict[str, Any]:
  mesh, total_steps = exp.mesh, exp.total_steps
  batch_size = config.input.batch_size

  # ----------------------------------------------------------- evaluators
  evals = {}
  if mode in ("eval", "train_eval") and len(config.evals):
    evals = evaluators.from_config(
        config.evals, predict_fn=exp.jit_eval_predict(meta.num_classes),
        source=exp.source(config.input.eval_split),
        preprocess_fn=experiment.eval_preprocess_fn(config), mesh=mesh,
        seed=config.seed, workdir=workdir, rules=config.sharding_rules,
    )

  def run_evals(step: int, names: list[str] | None = None) -> dict:
    results = {}
    for name in names if names is not None else list(evals):
      t0 = time.time()
      with jax.set_mesh(mesh):
        metrics = evals[name].run(
            state.ema_params, state.batch_stats, step=step)
      scalars = {f"eval/{name}/{k}": v for k, v in metrics.items()}
      scalars[f"time/eval_{name}_secs"] = time.time() - t0
      reporter.write_scalars(step, scalars)
      results[name] = metrics
    if results:  # The samplers' compiles freed heap that training reuses.
      host_memory.release_free_heap("after the evaluation")
    if results and jax.process_index() == 0:
      atomic.write_json(os.path.join(workdir, "metrics.json"),
                        {"step": step, **results}, indent=2,
                        default=_json_default)
    return results

  if mode == "eval":
    results = run_evals(start_step)
    _log_results(results, workdir)
    return results

  # ----------------------------------------------------------------- step
  if started_input is not None:
    train_iter, next_local = started_input
  else:
    train_iter, next_local = _start_input(
        config, train_source, local_batch_size, data_state,
        read_first=start_step < total_steps)
  t0 = time.time()
  if compiling is not None:
    compiled = compiling.result()
    logging.info("Compiled the train step alongside the initialisation "
                 "or restore (waited %.1fs after it).", time.time() - t0)
  else:
    compiled = exp.compile_train_step()
    logging.info("Compiled the train step in %.1fs.", time.time() - t0)
  memory = _log_memory(compiled)
  norms_fn = train_state.make_norms_fn(config.optax, exp.lr_schedule)
  _compile_loop_helpers(compiled, norms_fn, state)
  # The compiles and the initialisation freed gigabytes inside the heap:
  # returned before the step's temporaries add to the resident size.
  host_memory.release_free_heap("after the compile and the initialisation")
  if exp.keeps_host_heap:
    host_memory.keep_freed_heap()  # The step's temporaries stay mapped.

  # ----------------------------------------------------------------- loop
  block = _blocks_every_step(mesh)
  results: dict[str, Any] = {}
  last_good_ckpt = latest
  step = start_step
  tracker = empty_tracker()
  log_t0, log_step = time.time(), step
  with (_StopSignal() as stop,
        _temporaries_reserve(exp, memory.get("temp_bytes", 0)) as reserve):
    while step < total_steps:
      # Ready on CPU (`sharding.global_batch`), so a one-CPU step runs on
      # this thread: measured before, 3 steps in a row after an evaluation
      # went to a worker thread, whose heap maps the temporaries anew.
      batch = exp.global_batch(next_local)
      log_now = reporting.itstime(step + 1, config.log_training_steps,
                                  total_steps, first=True)
      with reserve.step():
        state, metrics = compiled(state, batch, train_rng)
      tracker = track_metrics(tracker, metrics, state.step)
      if log_now:  # From the state after the step: no copy of the params.
        norms = norms_fn(state.params, state.opt_state, metrics["skipped"])
      step += 1
      if block:
        jax.block_until_ready(metrics)
      # The input position after this step's batch, for its checkpoint: taken
      # before the next batch is read ahead.
      data_state = train_iter.get_state()
      # While the device computes: the next batch (input overlaps compute).
      next_local = next(train_iter) if step < total_steps else None
      ckpt_now = reporting.itstime(step, config.ckpt_steps, total_steps)
      due = [name for name in evals if reporting.itstime(
          step, config.evals[name].every_steps, total_steps)]
      stopping = stop.should_stop(step, at_sync_step=log_now)
      if log_now or ckpt_now or due or stopping:
        host = _fetch({"tracker": tracker, "metrics": metrics,
                       **({"norms": norms} if log_now else {})})
        _check_finite(host["tracker"], last_good_ckpt, workdir)
        if log_now:
          elapsed = max(time.time() - log_t0, 1e-9)
          scalars = {f"train/{k}": v for k, v in {
              **host["metrics"], **host["norms"]}.items()}
          count = max(int(host["tracker"]["count"]), 1)
          scalars["train/loss_mean"] = (
              float(host["tracker"]["loss_sum"]) / count)
          scalars["train/skipped"] = float(host["tracker"]["skipped"])
          scalars["time/steps_per_sec"] = (step - log_step) / elapsed
          scalars["time/examples_per_sec"] = (
              scalars["time/steps_per_sec"] * batch_size)
          reporter.write_scalars(step, scalars)
          if host["tracker"]["skipped"]:
            logging.warning("%d non-finite updates skipped up to step %d.",
                            int(host["tracker"]["skipped"]), step)
          tracker = empty_tracker()
          log_t0, log_step = time.time(), step
      reporter.step_done(step)
      if ckpt_now or (stopping and last_good_ckpt != step):
        _save_checkpoint(manager, step, state, _all_data_states(data_state),
                         heap_kept=reserve.active)
        last_good_ckpt = step
      if stopping:
        break
      if due:
        if step == total_steps:
          # The final checkpoint is complete before the final evaluation
          # runs, so a failing evaluation never costs the training.
          manager.wait_until_finished()
        # The evaluation's programs run on this thread too: their
        # temporaries reuse the step's pages, and the release after it
        # returns them all (the next step faults its own in again).
        # Measured with 4 sampling steps at batch 4: peak 5.80 GB against
        # 6.16 GB with the step's block held through the evaluation.
        reserve.close()
        results.update(run_evals(step, due))
  if stop.stopped:
    logging.warning("Stopped by signal at step %d; rerun to resume.", step)
  elif mode == "train_eval" and evals and not results:
    # Training had already finished (a rerun): evaluate the final state.
    manager.wait_until_finished()
    results = run_evals(step)
  reporter.flush()
  _log_results(results, workdir)
  return results


def _all_data_states(local: Any) -> list[Any]:
  """Every process's input-iterator state, in process order.

  Each process reads its own shard, so each needs its own position back on
  resume (grain refuses another shard's state). All processes call this at
  the same checkpoint step.
  """
  text = local.decode("utf-8") if isinstance(local, bytes) else local
  records = evaluators.base.gather_records(
      [{"index": jax.process_index(), "state": text}])
  return [r["state"].encode("utf-8") if isinstance(local, bytes)
          else r["state"] for r in records]


def _own_data_state(restored: Any) -> Any:
  """This process's iterator state from a checkpoint (None: start fresh)."""
  if not isinstance(restored, list):
    return restored  # Written by one process (or by an earlier version).
  if len(restored) != jax.process_count():
    logging.warning(
        "The checkpoint holds the input positions of %d processes, this run "
        "has %d: the data order restarts (the model state is restored).",
        len(restored), jax.process_count())
    return None
  return restored[jax.process_index()]


def _start_input(
    config: ml_collections.ConfigDict, train_source: Any,
    local_batch_size: int, data_state: Any, *, read_first: bool = True,
) -> tuple[Any, Any]:
  """The training iterator (at `data_state`) and its first batch.

  The first batch is read before anything compiles, so bad data fails in
  seconds rather than after a long compile.
  """
  train_iter = pipeline.make_train_loader(
      train_source,
      batch_size=local_batch_size,
      seed=config.seed,
      preprocess_fn=experiment.train_preprocess_fn(config),
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      num_workers=config.input.num_workers,
  )
  if data_state is not None:
    train_iter.set_state(data_state)
  return train_iter, next(train_iter) if read_first else None


def _compile_in_background(
    exp: Any, lowered: threading.Event | None = None,
) -> concurrent.futures.Future:
  """`exp.compile_train_step(lowered=lowered)` started in a worker thread.

  The compile needs only the abstract state, so it can run while the state
  is initialised or restored. The thread is not a daemon (a daemon thread
  inside XLA at interpreter exit can abort the process): if initialisation
  or the restore fails meanwhile, the process exits once the compile is
  done, after printing the error. On a fresh start bad data fails before
  the compile starts (`_start_input`); a resumed run's input starts after
  the restore, beside the compile. `lowered`, if given, is set once the
  step is lowered, before its compile starts.
  """
  pool = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix="compile_train_step")
  try:
    return pool.submit(exp.compile_train_step, lowered=lowered)
  finally:
    pool.shutdown(wait=False)


def _check_finite(tracker: dict, last_good_ckpt: int | None,
                  workdir: str) -> None:
  bad_step = int(tracker["first_nonfinite_step"])
  if bad_step:
    raise NonFiniteLossError(
        f"loss is not finite at step {bad_step}; last good checkpoint: "
        f"{'step ' + str(last_good_ckpt) if last_good_ckpt else 'none'} in "
        f"{workdir}/checkpoints (config.skip_nonfinite_updates=True skips "
        "such updates instead)"
    )


def _log_results(results: dict[str, Any], workdir: str) -> None:
  if not results or jax.process_index() != 0:
    return
  paths = {"metrics": os.path.join(workdir, "metrics.json")}
  for label in ("predictions", "overlays"):
    folder = os.path.join(workdir, label)
    if epath.Path(folder).is_dir():  # os.path.isdir is False on a bucket.
      paths[label] = folder
  logging.info("Results:\n%s", reporting.format_metrics_table(results, paths))


def _init_weights(state: Any, path: str, exp: Any) -> Any:
  """Weights only from `config.model_init`; optimizer state stays fresh.

  `path` is an ImageNet ResNet-50 export (torchvision or Keras layout, .npz
  or .safetensors: only the backbone is loaded) or one of our runs (a
  workdir, its checkpoints/ folder or a step folder: every weight). Position
  embeddings are sinusoidal and computed from the input size, so a low-res
  checkpoint initialises a high-res run without interpolation.
  """
  if weight_import.is_backbone_export(path):
    params, batch_stats, report = weight_import.load_backbone_weights(
        path, state.params, state.batch_stats
    )
    ema_params, _, _ = weight_import.load_backbone_weights(
        path, state.ema_params, state.batch_stats
    )
    logging.info(
        "ImageNet backbone from %s (%s layout): %d leaves, %d keys ignored.",
        path, report["layout"], report["num_loaded"],
        len(report["ignored_keys"]),
    )
    return state.replace(
        params=params, batch_stats=batch_stats, ema_params=ema_params
    )
  if epath.Path(path).is_file():
    # A file that is not a loadable export: say exactly why.
    raise weight_import.explain_not_an_export(path)
  loaded = exp.restore_weights(path)
  return state.replace(
      params=loaded.params, batch_stats=loaded.batch_stats,
      ema_params=loaded.ema_params,
  )


def _log_memory(compiled: Any) -> dict[str, int]:
  """Logs XLA's memory analysis of the step and returns it ({} if none)."""
  mem = reporting.compiled_memory(compiled)
  if mem:
    logging.info(
        "Train step memory: arguments %.1f MB, outputs %.1f MB, temporaries "
        "%.1f MB.", mem["argument_bytes"] / 1e6, mem["output_bytes"] / 1e6,
        mem["temp_bytes"] / 1e6,
    )
  return mem


def _save_checkpoint(manager: Any, step: int, state: Any, data_states: Any,
                     *, heap_kept: bool) -> None:
  """Writes the checkpoint of `step`, waited for where the heap is kept.

  Where the heap is kept (`heap_kept`, the reserve holding the step's
  temporaries), this heap's free pages go back to the OS before the write
  and the write's own buffers right after it. The write's buffers come from
  orbax's and tensorstore's threads, not from this thread's free pages
  (the log steps' parameter copy, 360 MiB at 256 / 128), so without the
  first release the write stacked on them: the loop's peak 5,790 / 5,783
  against 5,656 / 5,678 MiB (docs/speed.md). The write's buffers
  (0.1-0.25 GiB for the paper model's 1.5 GB state, with orbax's bytes in
  flight capped at 100 MB) are allocated and freed between steps, while
  `TemporariesReserve` holds the step's temporaries. Written during the
  next steps instead, they were cut from the temporaries' block the moment
  a step freed it: measured on the paper model at 256 / 128 on one CPU,
  each checkpoint left the process 4.6 GB larger (5.3, 10.0, 13.4 GB after
  two) and the two steps after it took 7-11 s instead of 3.3 s. On a CPU
  the write would compete with the steps for the same cores anyway.
  """
  if heap_kept:
    host_memory.release_free_heap(f"before the checkpoint of step {step}")
  checkpointing.save(manager, step, state, data_states, force=True)
  if not heap_kept:
    return
  t0 = time.time()
  manager.wait_until_finished()
  logging.info("Checkpoint of step %d written in %.1fs (waited for: the "
               "train step's host memory is kept between steps).",
               step, time.time() - t0)
  host_memory.release_free_heap(f"after the checkpoint of step {step}")


def _temporaries_reserve(exp: Any, temp_bytes: int
                         ) -> host_memory.TemporariesReserve:
  """Holds the step's temporaries between steps (`host_memory`).

  Only where they come from the main heap (`_step_uses_main_heap`);
  elsewhere a reserve of 0 bytes, which does nothing.
  """
  return host_memory.TemporariesReserve(
      temp_bytes if _step_uses_main_heap(exp) else 0)


def _step_uses_main_heap(exp: Any) -> bool:
  """Whether the step's temporaries come from the main thread's heap.

  Where the loop keeps the heap (`Experiment.keeps_host_heap`) and the step
  runs on the calling thread (one CPU device, inline dispatch).
  """
  return exp.keeps_host_heap and exp.mesh.size == 1


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value)}")
