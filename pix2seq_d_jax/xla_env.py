"""Settings that must be made before jax creates its backend.

XLA reads `XLA_FLAGS` once, when jax creates its first backend; options
passed to a single compile (`jax.jit(..., compiler_options=...)`) do not
reach XLA:CPU's scheduler (measured: the train step's temporaries stay the
same). So the entry points (`main`, `predict`, `benchmark`) call
`set_cpu_scheduler` before anything touches a device.

XLA:CPU's default scheduler is concurrency-optimised: it orders independent
operations so that they can run side by side, which keeps more temporaries
alive at once. Its memory-minimising list scheduler gives the paper model's
train step at 256 / 128 (batch 2, 2 cores) 2.27 instead of 2.87 GiB of
temporaries and a peak resident size of 5.4 instead of 6.1 GB, in the same
step time (docs/speed.md). The flag exists on every platform; GPU and TPU
compiles ignore it.

XLA:CPU hands a convolution to one of two libraries: YNNPACK (its default
for a convolution that is fused with nothing else) or Eigen. On the paper
model's shapes Eigen's is the faster one (2-core x86, float32, batch 2):
the 3×3 128→128 convolution on 128×128 maps 55 → 34 ms forward, and with
both gradients 1,163 → 412 ms for XLA's own 3×3 256→256 at 128×128, where
YNNPACK's weight gradient is slow; the train step at 256 / 128 8.42 →
7.48 s (medians of 8 alternated runs; docs/speed.md).
`set_cpu_convolutions('eigen')` takes convolutions out of YNNPACK's
fusion list; matmuls and reductions stay there (with YNNPACK off
altogether the matmuls are slower). Values differ only by float rounding.

Two more XLA:CPU options, off by default, are set for every entry point
(`set_cpu_defaults`, `CPU_DEFAULT_FLAGS`); each is worth about 1% of the
paper model's train step and leaves its values the same to the bit
(docs/speed.md):
- copy insertion's region analysis, which proves that a loop's carried
  values need no copy: jax's CPU lowering of the random numbers (dropout
  masks, the diffusion noise) is a rolled loop per draw, and the step at
  256 / 128 keeps 2,377 instead of 2,769 copies, 14 of them of 2–4 MB;
- kernels compiled for flushed subnormal floats (`--xla_cpu_ftz`): XLA's
  CPU runtime already runs its computations with subnormal results
  flushed to zero, so the generated code may as well assume it.
"""

import os
import sys
from typing import Any

from absl import logging

CPU_SCHEDULERS = ("memory", "concurrency")
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
CPU_CONVOLUTIONS = ("eigen", "ynnpack")
_YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# Removes one type from XLA's default list of YNNPACK fusions.
_WITHOUT_YNN_CONVOLUTIONS = f"{_YNN_FUSION_FLAG}=-individual_convolution"
# Set by every entry point unless `XLA_FLAGS` has the flag already.
CPU_DEFAULT_FLAGS = (
    ("--xla_cpu_copy_insertion_use_region_analysis", "true"),
    ("--xla_cpu_ftz", "true"),
)


def set_cpu_scheduler(scheduler: str) -> bool:
  """Selects XLA:CPU's scheduler for this process (and its children).

  Args:
    scheduler: 'memory' (fewest live temporaries) or 'concurrency'
      (XLA's default).

  Returns:
    Whether `XLA_FLAGS` was changed. A flag the user already put in
    `XLA_FLAGS` wins and is left alone.

  Raises:
    ValueError: an unknown scheduler name.
  """
  if scheduler not in CPU_SCHEDULERS:
    raise ValueError(f"cpu_scheduler={scheduler!r}: expected one of "
                     f"{list(CPU_SCHEDULERS)}")
  value = "false" if scheduler == "memory" else "true"
  return _add_xla_flag(_FLAG, f"{_FLAG}={value}",
                       f"cpu_scheduler={scheduler!r}")


def set_cpu_convolutions(library: str) -> bool:
  """Selects the library that runs XLA:CPU's convolutions in this process.

  Args:
    library: 'eigen' (convolutions out of YNNPACK's fusions) or 'ynnpack'
      (XLA's default; `XLA_FLAGS` is left as it is).

  Returns:
    Whether `XLA_FLAGS` was changed. A YNNPACK fusion-type flag the user
    already put in `XLA_FLAGS` wins and is left alone.

  Raises:
    ValueError: an unknown library name.
  """
  if library not in CPU_CONVOLUTIONS:
    raise ValueError(f"cpu_convolutions={library!r}: expected one of "
                     f"{list(CPU_CONVOLUTIONS)}")
  if library == "ynnpack":
    return False
  return _add_xla_flag(_YNN_FUSION_FLAG, _WITHOUT_YNN_CONVOLUTIONS,
                       f"cpu_convolutions={library!r}")


def set_cpu_defaults() -> list[str]:
  """Adds `CPU_DEFAULT_FLAGS` to `XLA_FLAGS` (module docstring).

  Returns:
    The flags it added. A flag the user already put in `XLA_FLAGS`
    (either value) wins and is left alone.
  """
  return [f"{name}={value}" for name, value in CPU_DEFAULT_FLAGS
          if _add_xla_flag(name, f"{name}={value}", name.removeprefix("--"))]


def cpu_convolution_library(xla_flags: str | None = None) -> str:
  """The library XLA:CPU runs unfused convolutions with, per `XLA_FLAGS`.

  XLA applies each of its fusion-type flags in turn to a list that starts
  as its default (which has `individual_convolution`): exact type names
  replace the list, `+`/`-` prefixed ones add to or remove from it
  (checked against jax 0.10's XLA, e.g. `=-individual_convolution`
  followed by `=-reduce` leaves convolutions to Eigen).

  Args:
    xla_flags: the flags to read; None reads this process's `XLA_FLAGS`
      (what jax's backend reads when it starts).

  Returns:
    'ynnpack' or 'eigen' (`CPU_CONVOLUTIONS`).
  """
  if xla_flags is None:
    xla_flags = os.environ.get("XLA_FLAGS", "")
  ynn = True
  for word in xla_flags.split():
    name, _, setting = word.partition("=")
    if name != _YNN_FUSION_FLAG:
      continue
    types = [t for t in setting.split(",") if t]
    if types and all(t[0] in "+-" for t in types):
      for t in types:
        if t[1:] == "individual_convolution":
          ynn = t[0] == "+"
    else:
      ynn = "individual_convolution" in types
  return "ynnpack" if ynn else "eigen"


def _add_xla_flag(name: str, flag: str, setting: str) -> bool:
  """Appends `flag` to `XLA_FLAGS` unless a flag `name` is there already.

  Returns whether it did; warns (naming `setting`) when jax's backend has
  read `XLA_FLAGS` already, so the flag would reach only child processes.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if name in flags:
    return False
  if _backend_started():
    logging.warning("%s takes effect only in a new process: jax's backend "
                    "has already read XLA_FLAGS.", setting)
  os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
  return True


def set_xla_flags(config: Any) -> None:
  """Writes this process's `XLA_FLAGS` settings.

  The config's scheduler and convolution library, and
  `CPU_DEFAULT_FLAGS`.
  """
  set_cpu_scheduler(config.get("cpu_scheduler", "memory"))
  set_cpu_convolutions(config.get("cpu_convolutions", "eigen"))
  set_cpu_defaults()


def _backend_started() -> bool:
  """Whether jax has created a backend (so XLA_FLAGS was read already)."""
  bridge = sys.modules.get("jax._src.xla_bridge")  # Not imported here.
  started = getattr(bridge, "backends_are_initialized", None)
  return bool(started is not None and started())


def run_cpu_computations_inline() -> None:
  """Runs single-device CPU computations on the thread that calls them.

  jax's CPU client dispatches asynchronously by default: a computation runs
  on a worker thread, whose glibc heap serves the train step's 2.3 GiB of
  temporaries (256 / 128) with a fresh mapping at every step. On the
  calling (main) thread they come from the main heap, which
  `host_memory.keep_freed_heap` makes keep them: about 700,000 page faults
  and 1.4 s of kernel time less per step. The client reads the setting when
  it is created; jax applies it to single-device computations only. The
  training loop does not wait on device values between log steps either
  way, and the input pipeline prefetches in its own workers.
  """
  if _backend_started():
    logging.warning("Inline CPU dispatch takes effect only in a new "
                    "process: jax's CPU client exists already.")
  import jax  # Here: XLA_FLAGS is set without importing jax.

  jax.config.update("jax_cpu_enable_async_dispatch", False)


def prepare_backend(config: Any) -> None:
  """Applies the config's before-the-backend settings (main, benchmark).

  `config.cpu_scheduler` and `config.cpu_convolutions` into `XLA_FLAGS`
  (with `CPU_DEFAULT_FLAGS`), and inline CPU dispatch when
  `config.reuse_host_memory` (the training loop then keeps the heap).
  """
  set_xla_flags(config)
  if config.get("reuse_host_memory", True):
    run_cpu_computations_inline()
