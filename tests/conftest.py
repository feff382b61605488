"""Settings shared by the whole suite: CPU, and fast compiles.

The tests check plumbing, shapes and numerics against references, not the
quality of XLA's optimised code, so every test compiles with lighter XLA
settings (`tests/fast_compile.py`). Many tests and the processes they start
compile the same tiny programs, so the whole session shares one persistent
compilation cache: a fresh empty folder per session (so every run starts
cold, as on CI), created by the first process that loads this file and
inherited by the xdist workers and every subprocess. The environment
variables are set before jax is imported, so the subprocesses the tests
start (entry points, workers, the notebook) inherit them.
"""

import atexit
import os
import shutil
import tempfile

from tests import fast_compile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
fast_compile.configure_environment()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="pix2seq_d_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  # Removed by the process that made it (the xdist controller), last.
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

from pix2seq_d_jax import host_memory  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

# The files that take longest (over 10 s of one worker, measured on the
# 2-core CI machine kind), in that order. With `--dist loadfile` and
# `--no-loadscope-reorder`, xdist hands out files in collection order, so
# starting with the longest ones (longest-processing-time first) keeps the
# two workers' finishing times close; every other file follows in its
# usual order.
_LONGEST_FIRST = (
    "test_multiprocess.py",
    "test_train_state.py",
    "test_train.py",
    "test_models.py",
    "test_sharding_multidevice.py",
    "test_benchmark.py",
    "test_notebook.py",
    "test_gcs.py",
    "test_predict.py",
    "test_train_loop.py",
    "test_fault_tolerance.py",
    "test_cli_errors.py",
    "test_video_data.py",
    "test_kitti_step.py",
    "test_cli_run_errors.py",
    "test_weight_import.py",
    "test_no_recompile.py",
    "test_video.py",
    "test_config_lib.py",
    "test_xla_env.py",
    "test_group_norm.py",
    "test_convolution.py",
    "test_gc_pause.py",
)


@pytest.fixture(autouse=True)
def allocator_changes(monkeypatch):
  """Records `host_memory`'s allocator settings instead of applying them.

  They last for the rest of a process, so a training run inside a test
  would change the xdist worker's allocator for every later test; the
  entry points the tests start as subprocesses apply them for real, and
  `test_host_memory.py` checks their effect in fresh processes.
  """
  calls = []
  for name in ("keep_freed_heap",):
    monkeypatch.setattr(host_memory, name,
                        lambda name=name: calls.append(name) or True)
  return calls


def pytest_collection_modifyitems(items):
  """Orders the collected tests by file, longest files first."""
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
