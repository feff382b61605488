"""How the suite compiles: XLA settings that make the tests' programs cheap.

The tests check plumbing, shapes and numerics against references, not the
quality of XLA's optimised code, and most of their time is compiling small
programs. Three settings, made by `conftest.py` before jax is imported (so
every subprocess a test starts inherits them):

- `jax_disable_most_optimizations`: about half of a compile at full
  optimisation.
- XLA:CPU's elemental loop emitter instead of its MLIR fusion emitters
  (`--xla_cpu_use_fusion_emitters=false`): at that optimisation level the
  MLIR pipeline each fusion goes through is about half of what is left
  (measured on the skeleton model's train step: 2.9 -> 1.5 s, the same
  loss to the bit). At full optimisation the elemental emitter compiles
  slower (the paper model's step: 93 instead of 63 s) and runs slower, so
  training keeps XLA's default, and a test that turns optimisations on
  compiles with `PRODUCTION_EMITTERS`.
- Every compile is written to the session's persistent cache, however
  short (`jax_persistent_cache_min_compile_time_secs=0`): the entry points
  the tests start compile the same tiny programs again and again.

A test that checks what the production compile makes (kernel counts,
values at full optimisation) passes `PRODUCTION_EMITTERS` as the
compile's `compiler_options`.
"""

import os

FUSION_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
# One compile's options that restore XLA:CPU's default (MLIR) emitters.
PRODUCTION_EMITTERS = {"xla_cpu_use_fusion_emitters": True}


def with_flag(xla_flags: str, flag: str) -> str:
  """`XLA_FLAGS` with `flag` appended, once."""
  words = xla_flags.split()
  return " ".join(words if flag in words else [*words, flag])


def configure_environment() -> None:
  """Sets the suite's compile settings in this process's environment.

  Must run before jax is imported; subprocesses inherit the variables.
  """
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  os.environ["XLA_FLAGS"] = with_flag(os.environ.get("XLA_FLAGS", ""),
                                      FUSION_EMITTER_FLAG)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
