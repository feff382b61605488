"""`train_and_evaluate(config, workdir)`: the training loop, top to bottom.

Sections: mesh, data, model/state/step (all from `experiment.create`),
checkpoint (resume), evaluators, loop. Every process runs the same code;
only process 0 writes summaries, predictions and overlays (orbax
coordinates checkpoints).
SIGTERM or SIGINT (preemption, Ctrl-C) saves a checkpoint at the current step
and returns normally; rerunning the same command resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from pix2seq_d_jax import (
    checkpointing,
    config_lib,
    evaluators,
    experiment,
    reporting,
    sharding,
)
from pix2seq_d_jax.data import pipeline
from pix2seq_d_jax.models import weight_import

MODES = ("train", "eval", "train_eval")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss."""


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. a notebook worker).
        pass
    return self

  def agreed(self) -> bool:
    """Whether to stop now, the same answer on every process.

    A signal reaches each host at its own moment; stopping after different
    steps would leave the others waiting in the next step's collectives, so
    with several processes the flag is combined (any process) each step.
    """
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.int32(local))
    return bool(np.asarray(flags).any())

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: stop now.
    self.received = signum
    logging.warning("Signal %d: checkpointing and stopping.", signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, mode: str = "train_eval"
) -> dict[str, Any]:
  """Trains and/or evaluates; returns the last eval metrics (may be empty).

  Args:
    config: a validated-or-not config (it is validated here first).
    workdir: checkpoints, metrics and outputs go here; an existing workdir
      resumes.
    mode: `train`, `eval` (latest checkpoint) or `train_eval`.
  """
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
  config_lib.validate(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  logging.info(
      "Process %d of %d; %d local / %d global devices (%s).",
      jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count(), jax.devices()[0].platform,
  )

  # ----------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  dp = sharding.data_parallel_size(mesh)
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
  abstract_state = exp.abstract_state
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  num_params = parameter_overview.count_parameters(abstract_state.params)
  logging.info(
      "Model %s: %s parameters.\n%s", config.model.name, f"{num_params:,}",
      parameter_overview.get_parameter_overview(
          abstract_state.params, include_stats=False, max_lines=60
      ),
  )

  # ----------------------------------------------------------- checkpoint
  manager = checkpointing.make_manager(workdir, keep=config.keep_ckpt)
  latest = manager.latest_step()
  data_state = None
  if latest is not None:
    logging.info("Resuming from %s step %d.", workdir, latest)
    state, data_state = checkpointing.restore(manager, latest, abstract_state)
  else:
    if mode == "eval" and not config.resume and not config.model_init:
      raise FileNotFoundError(
          f"--mode=eval: no checkpoint in {workdir}/checkpoints and neither "
          "config.resume nor config.model_init is set"
      )
    state = exp.init_state(init_rng)
    if config.resume:
      state = exp.restore_weights(config.resume)
    elif config.model_init:
      state = _init_weights(state, config.model_init, abstract_state)
  start_step = int(state.step)

  reporter = reporting.Reporter(workdir, total_steps=total_steps)
  reporter.write_config(config.to_dict())

  # ----------------------------------------------------------- evaluators
  predict_jit = exp.jit_eval_predict(meta.num_classes)
  evals = {}
  if mode in ("eval", "train_eval") and len(config.evals):
    eval_source = exp.source(config.input.eval_split)
    evals = evaluators.from_config(
        config.evals, predict_fn=predict_jit, source=eval_source,
        preprocess_fn=experiment.eval_preprocess_fn(config), mesh=mesh,
        seed=config.seed, workdir=workdir,
    )

  def run_evals(step: int, names: list[str] | None = None) -> dict:
    results = {}
    for name in names if names is not None else list(evals):
      evaluator = evals[name]
      t0 = time.time()
      with jax.set_mesh(mesh):
        metrics = evaluator.run(
            state.ema_params, state.batch_stats, step=step
        )
      scalars = {f"eval/{name}/{k}": v for k, v in metrics.items()}
      scalars[f"time/eval_{name}_secs"] = time.time() - t0
      reporter.write_scalars(step, scalars)
      results[name] = metrics
    if results and jax.process_index() == 0:
      _write_json(os.path.join(workdir, "metrics.json"),
                  {"step": step, **results})
    return results

  if mode == "eval":
    results = run_evals(start_step)
    reporter.close()
    manager.close()
    return results

  # ----------------------------------------------------------------- step
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
  # The first batch is read before compiling, so bad data fails in seconds
  # rather than after a long compile.
  next_local = next(train_iter) if start_step < total_steps else None
  t0 = time.time()
  compiled = exp.compile_train_step()
  logging.info("Compiled the train step in %.1fs.", time.time() - t0)
  _log_memory(compiled)

  # ----------------------------------------------------------------- loop
  results: dict[str, Any] = {}
  last_good_ckpt = latest
  step = start_step
  step_t0, steps_since_log = time.time(), 0
  with _StopSignal() as stop:
    while step < total_steps and not stop.agreed():
      local, next_local = next_local, None
      if local is None:
        local = next(train_iter)
      batch = exp.global_batch(local)
      state, metrics = compiled(state, batch, train_rng)
      step += 1
      steps_since_log += 1
      # Block every step: on CPU, queued steps with collectives deadlock
      # (STACK.md pitfall 2), and the loss is needed for the NaN check.
      metrics = jax.device_get(metrics)
      if metrics["skipped"]:
        logging.warning("Non-finite loss at step %d: update skipped.", step)
      elif not math.isfinite(float(metrics["loss"])):
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"loss is {metrics['loss']} at step {step} (last log at step "
            f"{step - steps_since_log}); last good checkpoint: "
            f"{'step ' + str(last_good_ckpt) if last_good_ckpt else 'none'} "
            f"in {workdir}/checkpoints"
        )
      reporter.step_done(step)
      if reporting.itstime(step, config.log_training_steps, total_steps,
                           first=True):
        elapsed = time.time() - step_t0
        scalars = {f"train/{k}": v for k, v in metrics.items()}
        scalars["time/steps_per_sec"] = steps_since_log / max(elapsed, 1e-9)
        scalars["time/examples_per_sec"] = (
            scalars["time/steps_per_sec"] * batch_size
        )
        reporter.write_scalars(step, scalars)
        step_t0, steps_since_log = time.time(), 0
      if reporting.itstime(step, config.ckpt_steps, total_steps):
        checkpointing.save(manager, step, state, train_iter.get_state(),
                           force=True)
        last_good_ckpt = step
      due = [name for name in evals if reporting.itstime(
          step, config.evals[name].every_steps, total_steps)]
      if due:
        results.update(run_evals(step, due))
  if stop.agreed():
    if last_good_ckpt != step and step > start_step:
      checkpointing.save(manager, step, state, train_iter.get_state(),
                         force=True)
    logging.warning("Stopped by signal at step %d; rerun to resume.", step)
  elif mode == "train_eval" and evals and not results:
    # Training had already finished (a rerun): evaluate the final state.
    results = run_evals(step)
  manager.wait_until_finished()
  manager.close()
  reporter.flush()
  reporter.close()
  return results


def _init_weights(state: Any, path: str, abstract_state: Any) -> Any:
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
  loaded = checkpointing.restore_weights(path, abstract_state)
  return state.replace(
      params=loaded.params, batch_stats=loaded.batch_stats,
      ema_params=loaded.ema_params,
  )


def _log_memory(compiled: Any) -> None:
  mem = reporting.compiled_memory(compiled)
  if mem:
    logging.info(
        "Train step memory: arguments %.1f MB, outputs %.1f MB, temporaries "
        "%.1f MB.", mem["argument_bytes"] / 1e6, mem["output_bytes"] / 1e6,
        mem["temp_bytes"] / 1e6,
    )


def _write_json(path: str, payload: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value)}")
