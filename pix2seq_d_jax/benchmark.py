r"""Speed benchmark of training and sampling on random inputs (no dataset).

  python -m pix2seq_d_jax.benchmark --config=configs/synthetic.py \
      [--batch_size 8] [--image_size 64 | H,W] [--mask_size 32 | H,W] \
      [--steps_list 1,5,10,20,50] [--train_iters 10] [--profile_steps 2] \
      [--output results.json] [--compare earlier.json] \
      [--nosampling] [--nohost_overhead] [--peak_tflops 989.4] \
      [--alternate model.conv_impl=lax ... [--alternate_pairs 6]] \
      [--config.model.dtype=bfloat16 ...]

Method. Every timing blocks on the result (`jax.block_until_ready`), because
jax dispatches asynchronously and an unblocked call measures only the
dispatch. Every function is compiled and run once before it is timed, and
each number is the median of several runs, which ignores the odd slow run
(another process, a page fault) that would skew a mean.

Ceilings. The same command measures what this machine reaches on the two
operations the model is made of: an f32 matmul (n^3 multiply-adds) and a 3x3
convolution (batch 8, 64x64x256 -> 256 by default). Their best is the
ceiling that the train step's achieved rate is compared with.

FLOPs. The train step's FLOPs are XLA's own count for the compiled program
(`compiled.cost_analysis()["flops"]`): a multiply-add counts 2, elementwise
ops count too, and both branches of the self-conditioning `lax.cond` are
counted although one runs per step. It is a property of the program, not a
measurement; achieved GFLOP/s is that count over the median step time.

Sampling. The encoder runs once per image and the decoder once per step, so
sampling time should be a + b * steps with b about one decoder pass. The
benchmark times the encoder and one decoder pass alone, the full predict
function for each step count (compiled once per count; all of them taken in
turn, `time_interleaved`, so that they see the same load), fits a and b by
least squares, and reports measured / (encoder + 20 * decoder) at 20
steps: above 1 is the sampler's own overhead (noise, schedule, bit
decoding).

Start-up. As in the training loop, the train step is lowered, then
compiles in a thread while the state is initialised; `startup_s` is the
time from the start to the first step done (lower, then compile | init,
then the first call). Without a
persistent compilation cache this is the cold start; run the command twice
with `JAX_COMPILATION_CACHE_DIR` set for the warm one (which then also
reads the lowered step back from the trace cache, `config.trace_cache`).
The first call's page faults and user / kernel CPU time (`getrusage`) are
reported next to a later step's: the extra time of a first call is mostly
the kernel mapping the step's new temporaries.

Op categories. `--profile_steps` train steps run under `jax.profiler`; each
executed XLA instruction's time is summed per category (convolution
forward, input gradient, weight gradient; matmul; transpose/copy; the
optimizer update; other) by `op_profile`. Each execution of an instruction
counts once, with its duration (an operation that splits its work over
both cores is one record; a convolution XLA:CPU gives to Eigen counts
until the next operation starts, see `op_profile`); shares are of the
summed op time.

Comparing. `--output r.json` saves every figure; a later run with
`--compare r.json` prints each figure next to the saved one with the ratio
now / before. On a shared machine the same step drifts by 10-20% within an
hour, so a small change is better judged in one process: `--alternate
field=value` (repeatable) compiles a variant config's train step too and
times the two in alternating pairs (A B, B A, ...; `--alternate_pairs`),
reporting both medians, the median per-pair difference and how many pairs
the variant won. Settings XLA reads once per process (`cpu_scheduler`,
`cpu_convolutions`, `reuse_host_memory`) cannot alternate: compare those
with `--output` / `--compare`.

One concept: the model's speed figures (ceilings, train step, sampling,
host overhead) and their CLI; the input pipeline's are in
`input_benchmark.py`.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import hashlib
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from pix2seq_d_jax import (
    config_lib,
    experiment,
    host_memory,
    op_profile,
    reporting,
    trace_cache,
    xla_env,
)
from pix2seq_d_jax.formats import atomic
from pix2seq_d_jax.models import accumulation

# ------------------------------------------------------------- measuring


def time_calls(
    fn: Callable[..., Any], *args: Any, repeats: int, warmup: int = 1
) -> list[float]:
  """Wall times in seconds of `repeats` blocked calls after `warmup` calls.

  Args:
    fn: the (jitted) function; its arguments must not be donated.
    *args: its arguments.
    repeats: number of timed calls (>= 1).
    warmup: untimed calls first (compilation, allocator warm-up).

  Returns:
    One time per timed call.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def time_interleaved(calls: dict[str, Callable[[], Any]], *, repeats: int,
                     warmup: int = 1) -> dict[str, list[float]]:
  """Wall times of each call, the calls taken in turn `repeats` times.

  Each call is made `warmup` times untimed first. Taken in turn, the
  calls see the same machine load, so ratios between them (the sampling
  fit: sampler against encoder + steps x decoder pass) are not skewed by
  a load that changes over the minutes a sequential measurement takes
  (on a shared 2-core machine: a fit of 1.100 measured sequentially
  against 0.985 in turn, same code).
  """
  for fn in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return times


def fit_linear(steps: Sequence[int], times: Sequence[float]
               ) -> tuple[float, float]:
  """Least-squares fit of time = a + b * steps.

  Args:
    steps: sampling step counts, at least two distinct values.
    times: the measured seconds, one per step count.

  Returns:
    (a, b): the intercept (seconds) and the slope (seconds per step).

  Raises:
    ValueError: fewer than two distinct step counts or mismatched lengths.
  """
  x = np.asarray(steps, np.float64)
  y = np.asarray(times, np.float64)
  if x.shape != y.shape or len(np.unique(x)) < 2:
    raise ValueError(
        f"--steps_list={list(steps)} with {len(times)} times: expected at "
        "least two distinct step counts and one time per count"
    )
  design = np.stack([np.ones_like(x), x], axis=1)
  (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
  return float(a), float(b)


def _flops(compiled: Any) -> float:
  cost = compiled.cost_analysis()
  # Older jax versions return one dict per device program.
  if isinstance(cost, list | tuple):
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


# Vendors' dense bfloat16 peak per chip in TFLOP/s (no sparsity), by jax's
# `device_kind`: the denominator of the model FLOPs utilisation (MFU).
# `--peak_tflops` gives it for a device not listed here.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H200": 989.4,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v6 lite": 918.0,
}


def peak_bf16_tflops(device_kind: str,
                     override: float | None = None) -> float | None:
  """The chip's dense bfloat16 peak in TFLOP/s, or None where unknown.

  Args:
    device_kind: `jax.Device.device_kind`, e.g. 'NVIDIA H200'.
    override: a peak given by the user (`--peak_tflops`); wins when set.

  Raises:
    ValueError: a non-positive override.
  """
  if override is not None:
    if override <= 0:
      raise ValueError(f"--peak_tflops={override}: expected > 0")
    return float(override)
  return PEAK_BF16_TFLOPS.get(device_kind)


def process_usage() -> dict[str, float]:
  """CPU time in user space and in the kernel, and page faults, so far.

  Differences of two readings (`usage_between`) say where a call's time
  went: a first call that faults its temporaries in spends it in the
  kernel (minor page faults: pages mapped, not read from disk).
  """
  r = resource.getrusage(resource.RUSAGE_SELF)
  return {"user_s": r.ru_utime, "kernel_s": r.ru_stime,
          "page_faults": r.ru_minflt + r.ru_majflt}


def usage_between(before: dict[str, float], after: dict[str, float],
                  calls: int = 1) -> dict[str, float]:
  """`process_usage` from `before` to `after`, per call of `calls`."""
  return {k: (after[k] - before[k]) / calls for k in before}


def program_identity(lowered: Any) -> dict[str, str | None]:
  """What identifies a lowered train step, so the lowering can be dropped.

  `sha256`: of the lowered program's text, equal to the training loop's
  step for the same config (both are `Experiment.lower_train_step`);
  `trace_cache`: "read from" or "written to" the trace cache, None when
  it is off.
  """
  cached = isinstance(lowered, trace_cache.TreeLowered)
  return {
      "sha256": hashlib.sha256(lowered.as_text().encode()).hexdigest(),
      "trace_cache": (None if not cached
                      else "read from" if lowered.hit else "written to"),
  }


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss) * (1 if sys.platform == "darwin" else 1024)


def measure_ceilings(
    *, matmul_size: int, conv_spatial: int, conv_channels: int,
    conv_batch: int = 8, repeats: int = 5, dtype: str = "float32",
    matmul_precision: str | None = None,
) -> dict[str, Any]:
  """GFLOP/s of a matmul and a 3x3 SAME convolution, float32 and bfloat16.

  Both dtypes are measured so that a bfloat16 run can be judged against
  what the machine's bfloat16 kernels reach (a CPU without native bf16
  arithmetic gains nothing from it). The bfloat16 matmul accumulates in
  float32 as the model's dense layers do; the convolution is the model's
  bf16 -> bf16 one.

  Args:
    matmul_size: n of the [n, n] x [n, n] matmul (2 n^3 FLOPs).
    conv_spatial: height and width of the convolution input.
    conv_channels: input and output channels of the convolution.
    conv_batch: convolution batch size.
    repeats: timed runs per operation; the median is used.
    dtype: the compute dtype of the run ('float32' or 'bfloat16'): its
      two figures make `ceiling_gflops`.
    matmul_precision: the run's `model.matmul_precision`; a bfloat16 one
      makes the bfloat16 matmul figure the run's matmul ceiling (its
      products take bfloat16 operands) beside the float32 convolution.

  Returns:
    The GFLOP/s of each (bfloat16 ones under `*_bf16_gflops`), their
    shapes, and the ceiling: the larger of the run dtype's two.
  """
  key_a, key_b, key_x, key_w = jax.random.split(jax.random.key(0), 4)
  n = matmul_size
  s, c = conv_spatial, conv_channels
  # As the model multiplies: a bfloat16 product accumulates in float32
  # (`models.accumulation`; XLA:CPU computes a bf16 -> bf16 one in f32).
  matmul = jax.jit(functools.partial(
      accumulation.dot_general, dimension_numbers=(((1,), (0,)), ((), ()))))
  conv = jax.jit(functools.partial(
      jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  ))
  figures: dict[str, float] = {}
  for suffix, ty in (("", jnp.float32), ("_bf16", jnp.bfloat16)):
    a = jax.random.normal(key_a, (n, n), ty)
    b = jax.random.normal(key_b, (n, n), ty)
    t_mm = statistics.median(time_calls(matmul, a, b, repeats=repeats))
    x = jax.random.normal(key_x, (conv_batch, s, s, c), ty)
    w = jax.random.normal(key_w, (3, 3, c, c), ty)
    t_conv = statistics.median(time_calls(conv, x, w, repeats=repeats))
    figures[f"matmul{suffix}_gflops"] = 2.0 * n**3 / t_mm / 1e9
    figures[f"conv{suffix}_gflops"] = (
        2.0 * conv_batch * s * s * c * c * 9 / t_conv / 1e9)
  conv_run = "_bf16" if dtype == "bfloat16" else ""
  matmul_run = ("_bf16" if dtype == "bfloat16" or (
      matmul_precision is not None
      and accumulation.requests_bfloat16_products(matmul_precision)) else "")
  return {
      "matmul_size": n,
      "conv_shape": [conv_batch, s, s, c, c],
      **figures,
      "ceiling_gflops": max(figures[f"matmul{matmul_run}_gflops"],
                            figures[f"conv{conv_run}_gflops"]),
  }


# ------------------------------------------------------------- benchmark


def random_batch(
    spec: dict[str, jax.ShapeDtypeStruct], *, num_classes: int,
    max_instances: int, seed: int = 0,
) -> dict[str, np.ndarray]:
  """A random batch with the fields and shapes of the train step's `spec`.

  Images are uniform in [0, 1], class and instance maps (and those of the
  conditioning frames of a video model) uniform over their ranges, loss
  weights 1.

  Raises:
    ValueError: `spec` has a field this function does not know.
  """
  rs = np.random.RandomState(seed)
  batch = {}
  for name, s in spec.items():
    if name == "image":
      value = rs.uniform(size=s.shape)
    elif name.endswith("semantic"):
      value = rs.randint(0, num_classes, s.shape)
    elif name.endswith("instance"):
      value = rs.randint(0, max_instances, s.shape)
    elif name == "loss_weight":
      value = np.ones(s.shape)
    else:
      raise ValueError(f"random_batch: unknown train batch field {name!r}")
    batch[name] = value.astype(s.dtype)
  return batch


# Host overhead is measured with this skeleton model at these sizes: its
# device time is small, so what remains per step is the loop's own cost.
_MICRO_MODEL = dict(
    backbone_width=8, backbone_depths=(1,), enc_layers=0, enc_dim=32,
    enc_mlp_dim=64, fuse_dim=16, dec_dim=16, dec_dim_mults=(1,),
    dec_transformer_layers=0, dec_transformer_dim=32,
)


def measure_host_overhead(
    config: ml_collections.ConfigDict, *, steps: int = 50
) -> dict[str, float]:
  """Host time per training step of the loop body, with a micro model.

  Runs what `train.py` does per step (global batch from host arrays, the
  compiled step, the on-device metrics tracker) for `steps` steps without
  blocking, as the loop does on one device, and times each part:
  `handoff_ms` (host arrays to a global device batch), `dispatch_ms` (the
  compiled step's call until it returns), `tracker_ms` (the metrics
  tracker's call), `wall_ms` per step until all are done, and `device_ms`
  (one blocked step). `host_ms` = handoff + tracker is the loop's own cost.
  On TPU/GPU the step's call returns at once (`dispatch_ms` ~ 0); XLA:CPU
  runs the step in the calling thread, so on CPU `dispatch_ms` is about
  `device_ms`.

  Args:
    config: the run's config; its model is replaced by a skeleton and its
      sizes by 32 / 16 so that device time is small.
    steps: timed steps.

  Returns:
    The times above in milliseconds per step, and `steps`.
  """
  from pix2seq_d_jax import train  # The loop's own tracker.

  # deepcopy keeps the size fields' types (a pair may replace an int).
  config = copy.deepcopy(config)
  config.model.update(_MICRO_MODEL)
  config.input.image_size, config.input.mask_size = 32, 16
  config.remat, config.grad_accum_steps = "none", 1
  exp = experiment.create(config, total_steps=max(steps, 10))
  num_classes = config.input.get("num_classes") or (
      2**config.diffusion.bits_per_channel)
  host_batch = random_batch(
      exp.batch_spec(), num_classes=num_classes,
      max_instances=config.input.max_instances, seed=config.seed)
  compiled = exp.compile_train_step()
  state = exp.init_state(jax.random.key(0))
  rng = jax.random.key(1)
  tracker = train.empty_tracker()
  with jax.set_mesh(exp.mesh):
    for _ in range(3):  # Warm-up: first calls allocate.
      state, metrics = compiled(state, exp.global_batch(host_batch), rng)
      tracker = train.track_metrics(tracker, metrics, state.step)
    jax.block_until_ready((state, tracker))
    handoff = dispatch = track = 0.0
    t_wall = time.perf_counter()
    for _ in range(steps):
      t0 = time.perf_counter()
      batch = exp.global_batch(host_batch)
      t1 = time.perf_counter()
      state, metrics = compiled(state, batch, rng)
      t2 = time.perf_counter()
      tracker = train.track_metrics(tracker, metrics, state.step)
      t3 = time.perf_counter()
      handoff, dispatch, track = (
          handoff + t1 - t0, dispatch + t2 - t1, track + t3 - t2)
    jax.block_until_ready((state, tracker))
    wall = time.perf_counter() - t_wall
    _, _, device_times = blocked_steps(
        compiled, state, exp.global_batch(host_batch), rng, repeats=5)
    device = statistics.median(device_times)
  ms = 1e3 / steps
  return {"host_ms": (handoff + track) * ms, "handoff_ms": handoff * ms,
          "dispatch_ms": dispatch * ms, "tracker_ms": track * ms,
          "wall_ms": wall * ms, "device_ms": 1e3 * device, "steps": steps}


def blocked_steps(
    compiled: Any, state: Any, batch: Any, rng: jax.Array, *, repeats: int
) -> tuple[Any, Any, list[float]]:
  """Runs the (state-donating) step `repeats` times, each one blocked on.

  Returns:
    The last state and metrics, and the wall time of each step in seconds.
  """
  times, metrics = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return state, metrics, times


# Config fields whose value XLA reads once, when the backend starts: two
# values cannot both be in one process, so `--alternate` refuses them (run
# the two settings as two processes and `--compare` their outputs).
PROCESS_WIDE_FIELDS = ("cpu_scheduler", "cpu_convolutions",
                       "reuse_host_memory")


def alternate_steps(
    step_a: Callable, state_a: Any, args_a: Sequence[Any],
    step_b: Callable, state_b: Any, args_b: Sequence[Any], *, pairs: int,
) -> tuple[Any, Any, dict[str, Any]]:
  """Times two state-donating steps in alternating order, one process.

  Pair i runs A then B when i is even, B then A when odd, each call blocked
  on, so both see the same machine: on a shared machine the same program's
  step time drifts by 10-20% within an hour, more than most changes, and
  only figures taken side by side compare.

  Args:
    step_a, step_b: `(state, *args) -> (state, metrics)`, e.g. compiled
      train steps; each is warmed up by the caller.
    state_a, state_b: their states (threaded through the calls).
    args_a, args_b: their other arguments.
    pairs: timed pairs (>= 1).

  Returns:
    The two last states, and {"pairs", "a_s", "b_s" (the step times),
    "a_median_s", "b_median_s", "ratio" (B's median / A's),
    "difference_median_s" (median of B - A per pair), "b_faster_pairs",
    "a_final_loss", "b_final_loss"}.
  """
  if pairs < 1:
    raise ValueError(f"--alternate_pairs={pairs}: expected >= 1")
  states = {"a": state_a, "b": state_b}
  steps = {"a": (step_a, args_a), "b": (step_b, args_b)}
  times: dict[str, list[float]] = {"a": [], "b": []}
  losses: dict[str, float] = {}
  for i in range(pairs):
    for name in ("a", "b") if i % 2 == 0 else ("b", "a"):
      step, args = steps[name]
      t0 = time.perf_counter()
      states[name], metrics = step(states[name], *args)
      jax.block_until_ready((states[name], metrics))
      times[name].append(time.perf_counter() - t0)
      losses[name] = float(metrics["loss"])
  differences = [b - a for a, b in zip(times["a"], times["b"], strict=True)]
  a_median = statistics.median(times["a"])
  b_median = statistics.median(times["b"])
  return states["a"], states["b"], {
      "pairs": pairs,
      "a_s": times["a"],
      "b_s": times["b"],
      "a_median_s": a_median,
      "b_median_s": b_median,
      "ratio": b_median / a_median,
      "difference_median_s": statistics.median(differences),
      "b_faster_pairs": sum(d < 0 for d in differences),
      "a_final_loss": losses["a"],
      "b_final_loss": losses["b"],
  }


def alternate_config(config: ml_collections.ConfigDict,
                     overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The `--alternate` variant of `config`, validated.

  Raises:
    config_lib.ConfigError: a bad override, one of `PROCESS_WIDE_FIELDS`,
      or an invalid variant.
  """
  for item in overrides:
    field = item.partition("=")[0].strip()
    if field in PROCESS_WIDE_FIELDS:
      raise config_lib.ConfigError(
          f"--alternate={item}: {field} is read once per process, so both "
          "settings cannot run in one; benchmark each in its own process "
          "and compare them with --output / --compare")
  variant = config_lib.with_overrides(config, overrides, flag="--alternate")
  config_lib.validate(variant)
  return variant


def profile_train_steps(
    compiled: Any, state: Any, batch: Any, rng: jax.Array, *, repeats: int,
    batch_size: int,
) -> tuple[Any, dict[str, Any]]:
  """Profiles `repeats` train steps; their op time per category.

  Args:
    compiled: the compiled (state-donating) train step.
    state, batch, rng: its arguments.
    repeats: steps inside the trace (after at least one untraced step).
    batch_size: the batch its convolutions see (micro-batch size).

  Returns:
    The last state, and `op_profile.category_shares` of the steps.
  """
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch, rng)
    jax.block_until_ready((holder[0], metrics))

  hlo_text = compiled.as_text()
  categories = op_profile.op_categories(hlo_text, batch_size)
  times = op_profile.traced_op_times(
      run, repeats=repeats, ops=categories,
      launched=op_profile.launched_instructions(hlo_text))
  return holder[0], op_profile.category_shares(categories, times)


def run_benchmark(
    config: ml_collections.ConfigDict,
    *,
    steps_list: Sequence[int] = (1, 5, 10, 20, 50),
    train_iters: int = 10,
    sample_repeats: int = 3,
    matmul_size: int = 2048,
    conv_spatial: int = 64,
    conv_channels: int = 256,
    ceiling_repeats: int = 5,
    sampling: bool = True,
    host_overhead: bool = True,
    profile_steps: int = 0,
    peak_tflops: float | None = None,
    alternate: Sequence[str] = (),
    alternate_pairs: int = 6,
) -> dict[str, Any]:
  """Measures ceilings, the train step and sampling; returns a JSON dict.

  Args:
    config: the run's config; `input.batch_size`, `image_size` and
      `mask_size` set the shapes. Validated here.
    steps_list: sampling step counts to time the predict function at.
    train_iters: timed train steps after the first (warm-up) call.
    sample_repeats: timed runs per sampling measurement (>= 3 advised).
    matmul_size: n of the matmul ceiling.
    conv_spatial: input height and width of the convolution ceiling.
    conv_channels: channels of the convolution ceiling.
    ceiling_repeats: timed runs per ceiling operation.
    sampling: also time the encoder, a decoder pass and the samplers.
    host_overhead: also measure the loop's host overhead
      (`measure_host_overhead`). Either can be left out where time is
      short (a first compile on an accelerator takes minutes).
    profile_steps: train steps to profile for the op-category breakdown
      (`profile_train_steps`); 0 skips the profile.
    peak_tflops: the device's dense bfloat16 peak per chip for the MFU;
      None looks it up by device kind (`PEAK_BF16_TFLOPS`; no MFU on CPU).
    alternate: `field=value` overrides of a variant config; if given, its
      train step is compiled too and timed against this config's in
      `alternate_pairs` alternating pairs (`alternate_steps`).
    alternate_pairs: pairs timed for `alternate`.

  Returns:
    Nested dict: `setup`, `ceilings`, `train`, `alternate` (with
    `alternate` only), `sampling`, `host_overhead`, `peak_rss_bytes`.

  Raises:
    config_lib.ConfigError: the config (with overrides) is invalid.
    ValueError: a bad `steps_list` or `train_iters`.
  """
  config_lib.validate(config)
  if train_iters < 1:
    raise ValueError(f"--train_iters={train_iters}: expected >= 1")
  if alternate_pairs < 1:
    raise ValueError(f"--alternate_pairs={alternate_pairs}: expected >= 1")
  # Checked before minutes of measuring.
  variant = alternate_config(config, alternate) if alternate else None
  if not steps_list or min(steps_list) < 1:
    raise ValueError(f"--steps_list={list(steps_list)}: expected counts >= 1")
  inp, d = config.input, config.diffusion
  batch_size = inp.batch_size
  num_bits = 2 * d.bits_per_channel
  num_classes = inp.get("num_classes") or 2**d.bits_per_channel
  peak = peak_bf16_tflops(jax.devices()[0].device_kind, peak_tflops)
  results: dict[str, Any] = {}

  # ------------------------------------------------------------ ceilings
  logging.info("Measuring the matmul and convolution ceilings.")
  results["ceilings"] = measure_ceilings(
      matmul_size=matmul_size, conv_spatial=conv_spatial,
      conv_channels=conv_channels, repeats=ceiling_repeats,
      dtype=config.model.dtype,
      matmul_precision=config.model.get("matmul_precision"),
  )

  # ------------------------------ model, state and step (as train.py)
  exp = experiment.create(config)
  mesh, model = exp.mesh, exp.model
  init_rng, train_rng, sample_rng = jax.random.split(
      jax.random.key(config.seed), 3)
  host_batch = random_batch(
      exp.batch_spec(), num_classes=num_classes,
      max_instances=inp.max_instances, seed=config.seed)
  batch = exp.global_batch(host_batch)
  # Start-up as the training loop does it: the step is lowered, then
  # compiles in a thread while the state is initialised
  # (`train._compile_in_background`).
  logging.info("Compiling the train step while initialising the state.")
  compile_times: dict[str, float] = {}
  lowered_event = threading.Event()

  def lower_and_compile():
    t0 = time.perf_counter()
    try:
      lowered = exp.lower_train_step()
    finally:
      lowered_event.set()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    compile_times.update(lower_s=t1 - t0,
                         compile_s=time.perf_counter() - t1)
    # Stage by stage in the log: a run cut off by a time limit (a
    # first compile on an accelerator can take minutes) says how far it got.
    logging.info("Train step lowered in %.1f s, compiled in %.1f s.",
                 compile_times["lower_s"], compile_times["compile_s"])
    return lowered, compiled

  t_start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    compiling = pool.submit(lower_and_compile)
    # As the loop does, the initialisation is traced once the step is
    # lowered (both traces hold the GIL).
    lowered_event.wait()
    t_init = time.perf_counter()
    state = jax.block_until_ready(exp.init_state(init_rng))
    init_s = time.perf_counter() - t_init
    logging.info("State initialised in %.1f s.", init_s)
    lowered, compiled = compiling.result()
    del compiling  # The future holds its result, the lowered step too.
  # The lowered step is dropped once identified, as the training loop drops
  # it after the compile: it holds the compile's MLIR attributes (139 MiB
  # at 256 / 128 on a cold compile), which would otherwise count in the
  # training peak. The loop does not hash its program, so the start-up
  # figure leaves this out.
  t_identity = time.perf_counter()
  program = program_identity(lowered)
  del lowered
  identity_s = time.perf_counter() - t_identity
  # As the training loop does: the heap the compiles and the initialisation
  # freed goes back to the OS before the step's temporaries, which then
  # stay mapped from step to step.
  host_memory.release_free_heap()
  if exp.keeps_host_heap:
    host_memory.keep_freed_heap()
  t2 = time.perf_counter()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  results["setup"] = {
      "model": config.model.name,
      "num_params": int(num_params),
      "batch_size": batch_size,
      "image_size": inp.image_size,
      "mask_size": inp.mask_size,
      "dtype": config.model.dtype,
      "matmul_precision": config.model.get("matmul_precision"),
      "remat": config.remat,
      "grad_accum_steps": config.grad_accum_steps,
      "video": exp.is_video,
      "device": jax.devices()[0].device_kind,
      "platform": jax.devices()[0].platform,
      "num_devices": jax.device_count(),
      "jax_version": jax.__version__,
      # Set: a second run starts warm (compiled programs read back).
      "compilation_cache": jax.config.jax_compilation_cache_dir,
      # The scheduler flag and any others the run was started with.
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "reuse_host_memory": config.get("reuse_host_memory", True),
      "peak_bf16_tflops": peak,
  }
  with jax.set_mesh(mesh):
    # The state is donated: each call consumes it and returns the next one.
    usage = process_usage()
    state, metrics = compiled(state, batch, train_rng)
    jax.block_until_ready((state, metrics))
    t3 = time.perf_counter()
    first_call_usage = usage_between(usage, process_usage())
    logging.info("First train step done in %.1f s; timing %d more.",
                 t3 - t2, train_iters)
    usage = process_usage()
    state, metrics, step_times = blocked_steps(
        compiled, state, batch, train_rng, repeats=train_iters)
    step_usage = usage_between(usage, process_usage(), train_iters)
    # Training's peak: taken before the profile and the analyses below,
    # which are the benchmark's, not training's (the FLOP count and the
    # optimised program's text add 100-200 MiB at 256 / 128).
    train_peak_rss = peak_rss_bytes()
    logging.info("Train step: median %.3f s.", statistics.median(step_times))
    profile = None
    if profile_steps:
      state, profile = profile_train_steps(
          compiled, state, batch, train_rng, repeats=profile_steps,
          batch_size=batch_size // config.grad_accum_steps)
  step_time = statistics.median(step_times)
  flops = _flops(compiled)
  achieved = flops / step_time / 1e9
  results["train"] = {
      **compile_times,
      "init_s": init_s,
      "first_call_s": t3 - t2,
      # Where the first call's extra time goes (its temporaries are new
      # pages) against the mean of the timed steps.
      "first_call_usage": first_call_usage,
      "step_usage": step_usage,
      # From nothing to the first step done: init | compile, first call.
      "startup_s": t3 - t_start - identity_s,
      # "read from" / "written to" the trace cache, None when it is off.
      "trace_cache": program["trace_cache"],
      "step_time_s": step_time,
      "step_time_min_s": min(step_times),
      "step_times_s": step_times,
      "images_per_s": batch_size / step_time,
      "flops_per_step": flops,
      "achieved_gflops": achieved,
      "fraction_of_ceiling": achieved / results["ceilings"]["ceiling_gflops"],
      # XLA's count is of one device's program, so per chip as the peak.
      "mfu": None if peak is None else achieved / (peak * 1e3),
      "memory": reporting.compiled_memory(compiled),
      "final_loss": float(metrics["loss"]),
      "peak_rss_bytes": train_peak_rss,
      "op_profile": profile,
      "program_sha256": program["sha256"],
  }

  if variant is not None:
    del state  # Both sides start again from the initial state.
    state = _alternate_with_variant(
        results, variant, alternate, exp, compiled, batch, init_rng,
        train_rng, num_classes=num_classes, pairs=alternate_pairs)

  if not sampling:
    if host_overhead:
      results["host_overhead"] = measure_host_overhead(config)
    results["peak_rss_bytes"] = peak_rss_bytes()
    return results

  # ------------------------------------------------------------- sampling
  host_memory.release_free_heap()  # The training's temporaries, freed.
  params, batch_stats = state.ema_params, state.batch_stats
  image = batch["image"]

  def encode(params, batch_stats, image):
    return model.apply({"params": params, "batch_stats": batch_stats}, image,
                       train=False, method="encode")

  def decode(params, batch_stats, x_t, gamma, encoded):
    # One decoder pass with the inputs the sampler gives it: the
    # self-conditioning estimate and, for a video model, the earlier
    # frames' conditioning map.
    x0_sc = jnp.zeros_like(x_t) if model.self_cond else None
    cond_map = None
    if model.cond_channels:
      cond_map = jnp.zeros(x_t.shape[:3] + (model.cond_channels,), x_t.dtype)
    return model.apply({"params": params, "batch_stats": batch_stats}, x_t,
                       gamma, encoded, self_cond_x0=x0_sc, cond_map=cond_map,
                       train=False, method="decode")

  with jax.set_mesh(mesh):
    encode_jit, decode_jit = jax.jit(encode), jax.jit(decode)
    encoded = encode_jit(params, batch_stats, image)
    _, mask_hw = config_lib.input_sizes(inp)
    x_t = jax.random.normal(sample_rng, (batch_size, *mask_hw, num_bits))
    gamma = jnp.full((batch_size,), 0.5, jnp.float32)
    calls = {
        "encoder": lambda: encode_jit(params, batch_stats, image),
        "decoder": lambda: decode_jit(params, batch_stats, x_t, gamma,
                                      encoded),
    }
    predict_compile = {}
    for steps in steps_list:
      predict_jit = jax.jit(
          exp.predict_fn(num_classes, num_steps=steps),
          in_shardings=(exp.state_shardings.params,
                        exp.state_shardings.batch_stats,
                        exp.batch_sharding, exp.replicated),
          out_shardings=exp.batch_sharding,
      )
      t0 = time.perf_counter()
      compiled_predict = predict_jit.lower(
          params, batch_stats, image, sample_rng).compile()
      predict_compile[str(steps)] = time.perf_counter() - t0
      logging.info("Sampler with %d steps compiled in %.1f s.", steps,
                   predict_compile[str(steps)])
      calls[str(steps)] = functools.partial(
          compiled_predict, params, batch_stats, image, sample_rng)
    # In turn: the fit compares the samplers with the encoder and a
    # decoder pass, so all see the same load.
    times = time_interleaved(calls, repeats=sample_repeats)
  predict_times = {str(s): statistics.median(times[str(s)])
                   for s in steps_list}
  encoder_s = statistics.median(times["encoder"])
  decoder_s = statistics.median(times["decoder"])
  sampling: dict[str, Any] = {
      "encoder_s": encoder_s,
      "decoder_s": decoder_s,
      "predict_s": predict_times,
      "predict_compile_s": predict_compile,
      "fit_a_s": None,
      "fit_b_s": None,
  }
  if len(set(steps_list)) >= 2:
    a, b = fit_linear(list(steps_list),
                      [predict_times[str(s)] for s in steps_list])
    sampling["fit_a_s"], sampling["fit_b_s"] = a, b
  # At 20 steps: the measurement when 20 was run, else the fit's value.
  if "20" in predict_times:
    at_20, source = predict_times["20"], "measured"
  elif sampling["fit_a_s"] is not None:
    at_20, source = sampling["fit_a_s"] + 20 * sampling["fit_b_s"], "fit"
  else:
    at_20, source = None, None
  sampling["ratio_20_steps"] = (
      None if at_20 is None else at_20 / (encoder_s + 20 * decoder_s))
  sampling["ratio_20_source"] = source
  results["sampling"] = sampling
  if host_overhead:
    results["host_overhead"] = measure_host_overhead(config)
  results["peak_rss_bytes"] = peak_rss_bytes()
  return results


def _alternate_with_variant(
    results: dict[str, Any], variant: ml_collections.ConfigDict,
    overrides: Sequence[str], exp: Any, compiled: Any, batch: Any,
    init_rng: jax.Array, rng: jax.Array, *, num_classes: int,
    pairs: int) -> Any:
  """Compiles the variant's step and times it against `compiled`.

  Both start from a state initialised with `init_rng` and take the same
  random batch (when their input shapes agree) and step key, so their
  losses compare: equal for the same program, close for a change that
  keeps the numerics. Fills `results["alternate"]`; returns A's last
  state.
  """
  exp_b = experiment.create(variant)
  t0 = time.perf_counter()
  lowered_b = exp_b.lower_train_step()
  compiled_b = lowered_b.compile()
  program_b = program_identity(lowered_b)
  del lowered_b
  compile_s = time.perf_counter() - t0
  logging.info("Variant's train step lowered and compiled in %.1f s.",
               compile_s)
  state = exp.init_state(init_rng)
  state_b = exp_b.init_state(init_rng)
  batch_b = exp_b.global_batch(random_batch(
      exp_b.batch_spec(), num_classes=num_classes,
      max_instances=variant.input.max_instances, seed=variant.seed))

  def step_a(state, *args):
    with jax.set_mesh(exp.mesh):
      return compiled(state, *args)

  def step_b(state, *args):
    with jax.set_mesh(exp_b.mesh):
      return compiled_b(state, *args)

  # One untimed step each, as the first pair's; losses are of the last.
  state, _ = step_a(state, batch, rng)
  state_b, _ = step_b(state_b, batch_b, rng)
  jax.block_until_ready((state, state_b))
  state, state_b, timing = alternate_steps(
      step_a, state, (batch, rng), step_b, state_b, (batch_b, rng),
      pairs=pairs)
  del state_b
  logging.info("Alternated %d pairs: A median %.3f s, B median %.3f s.",
               pairs, timing["a_median_s"], timing["b_median_s"])
  results["alternate"] = {
      "overrides": list(overrides),
      "compile_s": compile_s,
      "same_program": (results["train"]["program_sha256"]
                       == program_b["sha256"]),
      **timing,
  }
  return state


def format_table(results: dict[str, Any]) -> str:
  """The results as an aligned two-column text table.

  A run without sampling or host overhead (`--sampling=false`,
  `--host_overhead=false`) has no rows for them.
  """
  su, ce, tr = results["setup"], results["ceilings"], results["train"]
  mem = tr["memory"]
  mib = 2.0**20

  def opt(value, fmt):
    return "n/a" if value is None else format(value, fmt)

  rows = [
      ("model", f"{su['model']} ({su['num_params']:,} params, "
                f"{su['dtype']}"
                + (f", matmul precision {su['matmul_precision']}"
                   if su.get("matmul_precision") else "") + ")"),
      ("shapes", f"batch {su['batch_size']}, image {su['image_size']}, "
                 f"mask {su['mask_size']}"),
      ("device", f"{su['num_devices']} x {su['device']}"),
      ("matmul ceiling", f"{ce['matmul_gflops']:.1f} GFLOP/s f32, "
                         f"{ce['matmul_bf16_gflops']:.1f} bf16 "
                         f"(n={ce['matmul_size']})"),
      ("conv ceiling", f"{ce['conv_gflops']:.1f} GFLOP/s f32, "
                       f"{ce['conv_bf16_gflops']:.1f} bf16 "
                       f"{ce['conv_shape']}"),
      ("train start-up", f"{tr['startup_s']:.2f} s to the first step done "
                         "(persistent compilation cache "
                         f"{'on' if su['compilation_cache'] else 'off'}"
                         f"{_trace_cache_text(tr.get('trace_cache'))})"),
      ("  of which", f"{tr['lower_s']:.2f} s lower, then "
                     f"{tr['compile_s']:.2f} s compile | {tr['init_s']:.2f} s "
                     f"init, then {tr['first_call_s']:.2f} s first call"),
      ("  first call", _usage_text(tr["first_call_usage"]) + "; a later "
                       "step " + _usage_text(tr["step_usage"])),
      ("train step", f"{tr['step_time_s'] * 1e3:.1f} ms (median of "
                     f"{len(tr['step_times_s'])}, min "
                     f"{tr['step_time_min_s'] * 1e3:.1f}), "
                     f"{tr['images_per_s']:.1f} images/s"),
      ("train FLOPs", f"{tr['flops_per_step'] / 1e9:.2f} GFLOP/step, "
                      f"{tr['achieved_gflops']:.1f} GFLOP/s = "
                      f"{100 * tr['fraction_of_ceiling']:.1f}% of ceiling"),
      ("MFU", "n/a (no bf16 peak known for this device: --peak_tflops)"
              if tr.get("mfu") is None else
              f"{100 * tr['mfu']:.1f}% of the {su['peak_bf16_tflops']:g} "
              "TFLOP/s dense bf16 peak"),
      ("train memory", ", ".join(f"{k[:-6]} {v / mib:.1f} MiB"
                                 for k, v in mem.items()) or "n/a"),
  ]
  profile = tr.get("op_profile")
  if profile:
    rows.append(("op time (profile)",
                 f"{profile['total_s'] * 1e3:.1f} ms summed over executions"))
    for category in op_profile.CATEGORIES:
      rows.append((f"  {category}",
                   f"{100 * profile['share'][category]:5.1f}%  "
                   f"{profile['seconds'][category] * 1e3:.1f} ms"))
  al = results.get("alternate")
  if al:
    rows += [
        ("alternated with", " ".join(al["overrides"])
         + (" (the same program)" if al["same_program"] else "")),
        ("  train step A / B", f"{al['a_median_s'] * 1e3:.1f} / "
                               f"{al['b_median_s'] * 1e3:.1f} ms (medians, "
                               f"B / A = {al['ratio']:.3f})"),
        ("  B - A per pair", f"{al['difference_median_s'] * 1e3:+.1f} ms "
                             f"(median); B faster in {al['b_faster_pairs']} "
                             f"of {al['pairs']} pairs"),
        ("  final loss A / B", f"{al['a_final_loss']:.6f} / "
                               f"{al['b_final_loss']:.6f}"),
    ]
  sa = results.get("sampling")
  if sa:
    rows += [
        ("encoder", f"{sa['encoder_s'] * 1e3:.1f} ms"),
        ("decoder pass", f"{sa['decoder_s'] * 1e3:.1f} ms"),
    ]
    for steps, t in sa["predict_s"].items():
      rows.append((f"predict {steps} steps",
                   f"{t * 1e3:.1f} ms (compile "
                   f"{sa['predict_compile_s'][steps]:.1f} s)"))
    a_ms = None if sa["fit_a_s"] is None else sa["fit_a_s"] * 1e3
    b_ms = None if sa["fit_b_s"] is None else sa["fit_b_s"] * 1e3
    rows += [
        ("fit a + b*steps", f"a = {opt(a_ms, '.1f')} ms, "
                            f"b = {opt(b_ms, '.2f')} ms/step"),
        ("ratio at 20 steps", f"{opt(sa['ratio_20_steps'], '.3f')} "
                              f"({sa['ratio_20_source']})"),
    ]
  if results.get("host_overhead"):
    rows.append((
        "host overhead", "{host_ms:.2f} ms/step (handoff {handoff_ms:.2f}, "
        "tracker {tracker_ms:.2f}; step call {dispatch_ms:.2f}, device "
        "{device_ms:.2f}; micro model)".format(**results["host_overhead"])))
  rows += [
      ("peak host RSS", f"{tr['peak_rss_bytes'] / mib:.0f} MiB training, "
                        f"{results['peak_rss_bytes'] / mib:.0f} MiB whole "
                        "run"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _trace_cache_text(state: str | None) -> str:
  """The start-up row's note on the trace cache ('' when it was off)."""
  return "" if state is None else f", lowered step {state} the trace cache"


def _usage_text(usage: dict[str, float]) -> str:
  return (f"{usage['page_faults']:,.0f} page faults, "
          f"{usage['kernel_s']:.2f} s kernel + {usage['user_s']:.2f} s user "
          "CPU")


def _comparable_rows(results: dict[str, Any]) -> dict[str, float]:
  """{row name: value} of the figures `compare` puts side by side."""
  rows: dict[str, float] = {}
  tr = results.get("train", {})
  for key, name in (("step_time_s", "train step s (median)"),
                    ("step_time_min_s", "train step s (min)"),
                    ("startup_s", "start-up s"), ("init_s", "init s"),
                    ("compile_s", "train compile s"),
                    ("first_call_s", "first call s"),
                    ("peak_rss_bytes", "train peak RSS bytes")):
    if tr.get(key) is not None:
      rows[name] = tr[key]
  for key, name in (("first_call_usage", "first call"),
                    ("step_usage", "train step")):
    if tr.get(key):
      rows[f"{name} page faults"] = tr[key]["page_faults"]
      rows[f"{name} kernel CPU s"] = tr[key]["kernel_s"]
  profile = tr.get("op_profile") or {}
  for category, seconds in profile.get("seconds", {}).items():
    rows[f"op s: {category}"] = seconds
  sa = results.get("sampling", {})
  for key, name in (("encoder_s", "encoder s"), ("decoder_s", "decoder s")):
    if sa.get(key) is not None:
      rows[name] = sa[key]
  for steps, t in sa.get("predict_s", {}).items():
    rows[f"predict {steps} steps s"] = t
  if results.get("host_overhead"):
    rows["host overhead ms"] = results["host_overhead"]["host_ms"]
  if results.get("peak_rss_bytes"):
    rows["peak RSS bytes"] = results["peak_rss_bytes"]
  return rows


def compare(results: dict[str, Any], earlier: dict[str, Any]) -> str:
  """This run next to an earlier one's JSON: now, before, now / before.

  Rows present in only one of the two are listed with `n/a`. A ratio
  below 1 is faster (or smaller) now.
  """
  now, before = _comparable_rows(results), _comparable_rows(earlier)
  lines = [f"{'':<26}{'now':>14}{'before':>14}{'now/before':>12}"]
  for name in list(now) + [n for n in before if n not in now]:
    a, b = now.get(name), before.get(name)
    ratio = f"{a / b:12.3f}" if a is not None and b else f"{'n/a':>12}"
    fmt = lambda v: f"{'n/a':>14}" if v is None else f"{v:14.4g}"
    lines.append(f"{name:<26}{fmt(a)}{fmt(b)}{ratio}")
  return "\n".join(lines)


# ------------------------------------------------------------------- CLI


def _define_flags() -> dict[str, Any]:
  """Defines the CLI's flags; called only when run as a program.

  Importing this module (tests, other CLIs that define --config) then adds
  nothing to absl's global FLAGS.
  """
  return dict(
      config=config_flags.DEFINE_config_file(
          "config", "configs/synthetic.py", "Config file (path[:args]).",
          lock_config=True,
      ),
      batch_size=flags.DEFINE_integer(
          "batch_size", None, "Overrides config.input.batch_size.",
          lower_bound=1),
      image_size=flags.DEFINE_string(
          "image_size", None,
          "Overrides config.input.image_size: N or H,W."),
      mask_size=flags.DEFINE_string(
          "mask_size", None, "Overrides config.input.mask_size: N or H,W."),
      steps_list=flags.DEFINE_list(
          "steps_list", ["1", "5", "10", "20", "50"],
          "Sampling step counts to time predict at."),
      train_iters=flags.DEFINE_integer(
          "train_iters", 10, "Timed train steps.", lower_bound=1),
      sample_repeats=flags.DEFINE_integer(
          "sample_repeats", 3, "Timed runs per sampling measurement.",
          lower_bound=1),
      matmul_size=flags.DEFINE_integer(
          "matmul_size", 2048, "n of the matmul ceiling.", lower_bound=1),
      conv_spatial=flags.DEFINE_integer(
          "conv_spatial", 64, "Height/width of the conv ceiling.",
          lower_bound=1),
      conv_channels=flags.DEFINE_integer(
          "conv_channels", 256, "Channels of the conv ceiling.",
          lower_bound=1),
      profile_steps=flags.DEFINE_integer(
          "profile_steps", 2, "Train steps profiled for the op-category "
          "breakdown (0: none).", lower_bound=0),
      sampling=flags.DEFINE_boolean(
          "sampling", True, "Also time the encoder, a decoder pass and the "
          "sampler for each --steps_list count (each count compiles its "
          "own sampler)."),
      host_overhead=flags.DEFINE_boolean(
          "host_overhead", True, "Also measure the training loop's host "
          "overhead per step (a micro model)."),
      output=flags.DEFINE_string(
          "output", None, "Write the results as JSON to this file."),
      peak_tflops=flags.DEFINE_float(
          "peak_tflops", None, "The device's dense bfloat16 peak per chip "
          "in TFLOP/s, for the MFU row (default: known accelerators by "
          "device kind; none on CPU)."),
      alternate=flags.DEFINE_multi_string(
          "alternate", [], "A config override (field=value, e.g. "
          "model.conv_impl=lax) of a variant whose train step is compiled "
          "too and timed against this config's in alternating pairs, in "
          "this process; repeat the flag for several fields."),
      alternate_pairs=flags.DEFINE_integer(
          "alternate_pairs", 6, "Timed pairs for --alternate.",
          lower_bound=1),
      compare=flags.DEFINE_string(
          "compare", None, "An earlier run's --output JSON: print each "
          "figure next to it, with the ratio."),
  )


def _read_earlier(path: str) -> dict[str, Any]:
  """The JSON of an earlier `--output`, with an error naming the file."""
  try:
    with open(path) as f:
      earlier = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"--compare={path}: cannot read an earlier --output "
                     f"JSON ({e})") from e
  if not isinstance(earlier, dict) or "train" not in earlier:
    raise ValueError(f"--compare={path}: not a benchmark --output JSON (no "
                     "'train' section)")
  return earlier


def _parse_size(text: str, flag: str) -> tuple[int, int]:
  """`N` or `H,W` as (height, width), with an error naming the flag."""
  try:
    parts = [int(p) for p in text.split(",")]
  except ValueError as e:
    raise ValueError(f"{flag}={text}: expected N or H,W (integers)") from e
  return config_lib.size_hw(parts[0] if len(parts) == 1 else parts, flag)


def _main(argv: Sequence[str], cli: dict[str, Any]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  config = cli["config"].value
  if cli["batch_size"].value is not None:
    config.input.batch_size = cli["batch_size"].value
  try:
    for name in ("image_size", "mask_size"):
      if cli[name].value is not None:
        config.input[name] = _parse_size(cli[name].value, f"--{name}")
    try:
      steps_list = [int(s) for s in cli["steps_list"].value]
    except ValueError as e:
      raise ValueError(
          f"--steps_list={','.join(cli['steps_list'].value)}: expected "
          "comma-separated integers") from e
    # Read first: a bad path fails before minutes of measuring.
    earlier = (_read_earlier(cli["compare"].value) if cli["compare"].value
               else None)
    # As `main` does, before the first device use (XLA reads it once).
    xla_env.prepare_backend(config)
    results = run_benchmark(
        config, steps_list=steps_list, train_iters=cli["train_iters"].value,
        sample_repeats=cli["sample_repeats"].value,
        matmul_size=cli["matmul_size"].value,
        conv_spatial=cli["conv_spatial"].value,
        conv_channels=cli["conv_channels"].value,
        profile_steps=cli["profile_steps"].value,
        peak_tflops=cli["peak_tflops"].value,
        sampling=cli["sampling"].value,
        host_overhead=cli["host_overhead"].value,
        alternate=cli["alternate"].value,
        alternate_pairs=cli["alternate_pairs"].value,
    )
  except (config_lib.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_table(results))
  if earlier is not None:
    print(f"\ncompared with {cli['compare'].value}:")
    print(compare(results, earlier))
  if cli["output"].value:
    atomic.write_json(cli["output"].value, results, indent=2)
    print(f"wrote {cli['output'].value}")


if __name__ == "__main__":
  _cli = _define_flags()
  app.run(
      functools.partial(_main, cli=_cli), flags_parser=config_lib.parse_flags
  )
