"""`train_and_evaluate` compiles a fixed set of programs, whatever its length.

Every XLA compilation (a persistent-cache hit included) is counted by name
through jax's monitoring hook on the backend-compile event, for in-process
runs of 2 and 10 train steps followed by evaluations of 1 and 3 batches. The
counts must be equal: nothing is recompiled per train step or per eval
batch. A first run warms the process-wide caches of small eager operations,
which would otherwise count only in whichever run comes first.
"""

import collections
import contextlib

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import synthetic
from pix2seq_d_jax import train
from tests.multiprocess_worker import NARROW_MODEL, shared_cache_dir

pytestmark = pytest.mark.slow

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# (train steps, eval batches) of the two runs compared. 10 steps is the
# length of test_fault_tolerance's runs: the session's compilation cache
# then holds this config's compiled step already.
SHORT, LONG = (2, 1), (10, 3)


def _config(data_dir, train_steps, eval_batches):
  config = synthetic.get_config("tiny")
  config.model.update(NARROW_MODEL)
  config.input.data_dir = data_dir
  config.input.synthetic.num_val = 6
  config.total_steps = train_steps
  config.ckpt_steps = 5
  config.log_training_steps = 1
  config.evals.panoptic.batch_size = 2
  config.evals.panoptic.max_examples = 2 * eval_batches
  config.evals.panoptic.num_overlays = 1
  return config


@contextlib.contextmanager
def _fast_compiles_with_cache(cache_dir):
  """Unoptimised compiles and a persistent cache, restored afterwards."""
  names = ("jax_disable_most_optimizations", "jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs")
  saved = {n: jax.config.values[n] for n in names}
  jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for n, value in saved.items():
      jax.config.update(n, value)
    compilation_cache.reset_cache()


def _count_compiles(config, workdir):
  counts = collections.Counter()

  def listener(event, duration, **kwargs):
    del duration
    if event == COMPILE_EVENT:
      counts[kwargs.get("fun_name", "?")] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    results = train.train_and_evaluate(config, workdir, "train_eval")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return counts, results


def test_compile_count_independent_of_steps_and_eval_batches(
    tmp_path, tmp_path_factory, monkeypatch):
  data_dir = str(tmp_path / "data")
  with _fast_compiles_with_cache(shared_cache_dir(tmp_path_factory)):
    _count_compiles(_config(data_dir, *SHORT), str(tmp_path / "warmup"))
    released = []
    monkeypatch.setattr(train.host_memory, "release_free_heap",
                        lambda why="": released.append(why) or 0)
    short, short_results = _count_compiles(_config(data_dir, *SHORT),
                                           str(tmp_path / "short"))
    # The final checkpoint's write and the samplers' compiles freed heap
    # too: returned after each (the checkpoint is written before the final
    # evaluation starts).
    assert released == ["after the compile and the initialisation",
                        "before the checkpoint of step 2",
                        "after the checkpoint of step 2",
                        "after the evaluation"]
    long, long_results = _count_compiles(_config(data_dir, *LONG),
                                         str(tmp_path / "long"))
  assert short_results["panoptic"]["num_images"] == 2 * SHORT[1]
  assert long_results["panoptic"]["num_images"] == 2 * LONG[1]
  # The counter sees the run's own programs, once each.
  assert short["jit(train_step)"] == 1, short
  assert short["jit(predict)"] == 1, short
  assert long == short
