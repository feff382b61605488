"""The train step lowered, then compiled, in a thread; tracing signalled."""

import threading

import pytest

from configs import synthetic
from pix2seq_d_jax import experiment


class _Lowered:
  def __init__(self, compiled):
    self.compiled = compiled

  def compile(self):
    return self.compiled


class _SlowExperiment:
  """Lowers only once `release` is set; counts the lowerings."""

  def __init__(self, error=None):
    self.release, self.error, self.lowerings = threading.Event(), error, 0

  def lower_train_step(self):
    self.lowerings += 1
    assert self.release.wait(10)
    if self.error:
      raise self.error
    return _Lowered("compiled step")


def test_traced_is_set_only_once_lowering_is_over():
  exp = _SlowExperiment()
  compiling = experiment.BackgroundCompile(exp)
  assert not compiling.traced.wait(0.2)  # Still lowering.
  exp.release.set()
  compiling.wait_traced()
  lowered, compiled = compiling.result()
  assert compiled == "compiled step" and isinstance(lowered, _Lowered)
  assert exp.lowerings == 1
  assert set(compiling.times) == {"lower_s", "compile_s"}
  assert compiling.times["lower_s"] >= 0.2


def test_a_lowering_error_releases_the_waiter_and_is_raised():
  exp = _SlowExperiment(error=ValueError("bad shapes"))
  compiling = experiment.BackgroundCompile(exp)
  exp.release.set()
  compiling.wait_traced()  # Does not hang on a failed lowering.
  with pytest.raises(ValueError, match="bad shapes"):
    compiling.result()
  assert "compile_s" not in compiling.times


def test_the_background_step_is_the_experiment_step():
  exp = experiment.create(synthetic.get_config("tiny"))
  compiling = exp.compile_train_step_in_background()
  lowered, compiled = compiling.result()
  assert lowered.as_text() == exp.lower_train_step().as_text()
  assert compiled.as_text() == lowered.compile().as_text()
