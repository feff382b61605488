"""Settings shared by the whole suite: CPU, and one fast-compile setting.

The tests check plumbing, shapes and numerics against references, not the
quality of XLA's optimised code, so every test compiles with
`jax_disable_most_optimizations` (about half the compile time). The
environment variables are set before jax is imported, so the subprocesses
the tests start (entry points, workers, the notebook) inherit both.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
