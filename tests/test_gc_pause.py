"""The collector is held off while jax traces, and resumes as it was."""

import gc
import threading

import pytest

from pix2seq_d_jax import gc_pause


@pytest.fixture(autouse=True)
def _collector_on():
  was = gc.isenabled()
  gc.enable()
  yield
  if not was:
    gc.disable()


def test_paused_nests_and_restores_even_on_error():
  with gc_pause.paused():
    assert not gc.isenabled()
    with gc_pause.paused():
      assert not gc.isenabled()
    assert not gc.isenabled()  # The outer pause still holds.
  assert gc.isenabled()
  with pytest.raises(RuntimeError), gc_pause.paused():
    raise RuntimeError("inside")
  assert gc.isenabled()


def test_a_collector_the_user_turned_off_stays_off():
  gc.disable()
  with gc_pause.paused():
    pass
  assert not gc.isenabled()


def test_resumes_only_after_the_last_thread_is_done():
  entered, release = threading.Event(), threading.Event()

  def trace_in_thread():
    with gc_pause.paused():
      entered.set()
      release.wait(10)

  thread = threading.Thread(target=trace_in_thread)
  thread.start()
  entered.wait(10)
  with gc_pause.paused():
    pass
  # The main thread's pause ended first: the thread's still holds.
  assert not gc.isenabled()
  release.set()
  thread.join(10)
  assert gc.isenabled()


def test_lowering_the_train_step_runs_no_collection():
  import jax

  from configs import synthetic
  from pix2seq_d_jax import experiment

  config = synthetic.get_config("tiny")
  paused_exp, control_exp = (experiment.create(config) for _ in range(2))
  collections = []

  def count(phase, info):
    if phase == "start":
      collections.append(info["generation"])

  gc.callbacks.append(count)
  try:
    paused_exp.lower_train_step()
    during = len(collections)
    # The same trace (a new step function, so nothing is cached) with the
    # collector on: it does collect, so the count above can see them.
    with jax.set_mesh(control_exp.mesh):
      control_exp.train_step.lower(
          control_exp.abstract_state, control_exp.batch_spec(),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
  finally:
    gc.callbacks.remove(count)
  # At most the one pass that runs as the collector resumes at the end.
  assert during <= 1
  assert len(collections) - during > 10
