"""The trace cache: a warm lowering reads the step back, the same program."""

import contextlib

import jax
import numpy as np
import pytest

from configs import synthetic
from pix2seq_d_jax import benchmark, config_lib, experiment, trace_cache
from tests.multiprocess_worker import NARROW_MODEL


def _config(batch_size=2):
  config = synthetic.get_config("tiny")
  config.model.update(NARROW_MODEL)
  config.input.batch_size = batch_size
  config.input.image_size = 32
  config.input.mask_size = 16
  return config


@contextlib.contextmanager
def _compilation_cache(path):
  saved = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(path))
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", saved)


def _entries(cache):
  folder = cache / experiment.TRACE_CACHE_SUBDIR
  return sorted(folder.glob(f"*{trace_cache.SUFFIX}")) if folder.exists() \
      else []


class _CountingSteps:
  """Counts how often the Experiment's step function is traced."""

  def __init__(self, monkeypatch):
    self.traces = 0
    original = experiment.Experiment.train_step_fn

    def train_step_fn(exp):
      fn = original(exp)

      def counted(*args):
        self.traces += 1
        return fn(*args)
      return counted

    monkeypatch.setattr(experiment.Experiment, "train_step_fn", train_step_fn)


def _one_step(exp, compiled):
  batch = exp.global_batch(benchmark.random_batch(
      exp.batch_spec(), num_classes=10, max_instances=4, seed=0))
  state = exp.init_state(jax.random.key(0))
  with jax.set_mesh(exp.mesh):
    return compiled(state, batch, jax.random.key(1))


def test_a_warm_lowering_reads_the_step_and_computes_the_same(
    tmp_path, monkeypatch):
  counter = _CountingSteps(monkeypatch)
  with _compilation_cache(tmp_path):
    cold = experiment.create(_config()).lower_train_step()
    assert isinstance(cold, trace_cache.TreeLowered) and not cold.hit
    assert counter.traces == 1 and len(_entries(tmp_path)) == 1

    warm_exp = experiment.create(_config())
    warm = warm_exp.lower_train_step()
    assert warm.hit and counter.traces == 1  # Read back, not traced.
    assert warm.as_text() == cold.as_text()

    plain_config = _config()
    plain_config.trace_cache = False
    plain_exp = experiment.create(plain_config)
    assert plain_exp.trace_cache_dir is None
    plain = plain_exp.lower_train_step()
    assert isinstance(plain, jax.stages.Lowered) and counter.traces == 2

    state, metrics = _one_step(warm_exp, warm.compile())
    ref_state, ref_metrics = _one_step(plain_exp, plain.compile())
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  assert sorted(metrics) == sorted(ref_metrics)
  for got, want in zip(jax.tree.leaves((state, metrics)),
                       jax.tree.leaves((ref_state, ref_metrics)),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  # The state really moved (step count, moments): the comparison is not of
  # two initial states.
  assert float(ref_metrics["loss"]) > 0
  initial = plain_exp.init_state(jax.random.key(0))
  assert sum(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(ref_state), jax.tree.leaves(initial),
      strict=True)) > len(jax.tree.leaves(ref_state.params))


def test_no_compilation_cache_no_trace_cache():
  with _compilation_cache(""):
    exp = experiment.create(_config())
    assert exp.trace_cache_dir is None
    assert isinstance(exp.lower_train_step(), jax.stages.Lowered)


def test_an_unreadable_or_unfitting_entry_is_traced_again(tmp_path,
                                                         monkeypatch):
  counter = _CountingSteps(monkeypatch)
  with _compilation_cache(tmp_path):
    experiment.create(_config(batch_size=4)).lower_train_step()
    (other,) = _entries(tmp_path)
    experiment.create(_config()).lower_train_step()
    (entry,) = [e for e in _entries(tmp_path) if e != other]
    assert counter.traces == 2

    entry.write_bytes(b"not an exported step")
    again = experiment.create(_config()).lower_train_step()
    assert not again.hit and counter.traces == 3
    assert experiment.create(_config()).lower_train_step().hit  # Rewritten.

    # An entry of another batch size under this key: a miss, not an error.
    entry.write_bytes(other.read_bytes())
    again = experiment.create(_config()).lower_train_step()
    assert not again.hit and counter.traces == 4


def _key(config=None, extra=None, batch_size=2):
  exp = experiment.create(config or _config(batch_size=batch_size))
  args = (exp.abstract_state, exp.batch_spec(),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
  return trace_cache.trace_key(
      (config or _config()).to_json_best_effort(sort_keys=True),
      extra or {"total_steps": 10}, exp.mesh, args)


def test_the_key_follows_what_the_trace_depends_on(monkeypatch):
  base = _key()
  assert _key() == base
  changed = _config()
  changed.diffusion.self_cond_rate = 0.25
  assert _key(config=changed) != base
  assert _key(extra={"total_steps": 11}) != base
  assert _key(batch_size=4) != base
  monkeypatch.setattr(trace_cache, "source_digest", lambda: "edited")
  assert _key() != base
  monkeypatch.undo()
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
  assert _key() != base
  jax.config.update("jax_default_matmul_precision", "bfloat16")
  try:
    assert _key() != base
  finally:
    jax.config.update("jax_default_matmul_precision", None)


def test_source_digest_reads_the_package():
  digest = trace_cache.source_digest()
  assert len(digest) == 64 and digest == trace_cache.source_digest()
  assert trace_cache.tree_digest(trace_cache.PACKAGE_ROOT) == digest


def test_tree_digest_covers_every_python_file(tmp_path):
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.py").write_text("y = 2\n")
  base = trace_cache.tree_digest(tmp_path)
  (tmp_path / "notes.txt").write_text("not code")
  assert trace_cache.tree_digest(tmp_path) == base
  (tmp_path / "sub" / "b.py").write_text("y = 3\n")
  assert trace_cache.tree_digest(tmp_path) != base
  (tmp_path / "sub" / "b.py").write_text("y = 2\n")
  assert trace_cache.tree_digest(tmp_path) == base
  (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py")
  assert trace_cache.tree_digest(tmp_path) != base


def test_config_rejects_a_non_bool_trace_cache():
  config = _config()
  config_lib.validate(config)
  del config["trace_cache"]  # The field's type is bool: retyped.
  config.trace_cache = "yes"
  with pytest.raises(config_lib.ConfigError, match="trace_cache"):
    config_lib.validate(config)
