"""Tests of the benchmark: the fit, the timer, and one tiny end-to-end run."""

import gc
import hashlib
import json
import time
import weakref

import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from pix2seq_d_jax import benchmark, config_lib, experiment, op_profile
from tests.multiprocess_worker import NARROW_MODEL


def _tiny_config():
  config = synthetic.get_config("tiny")
  config.model.update(NARROW_MODEL)  # Bookkeeping is under test: compile fast.
  config.input.batch_size = 2
  config.input.image_size = 32
  config.input.mask_size = 16
  return config


# What happened during the module's benchmark run, in order: the timed
# steps, each peak-RSS reading (with the value it returned), the profile and
# the FLOP count; and whether a lowered step was still alive at the steps.
_EVENTS: list[tuple[str, object]] = []


@pytest.fixture(scope="module")
def results():
  lowered_refs = []
  lower = experiment.Experiment.lower_train_step
  blocked_steps = benchmark.blocked_steps
  profile = benchmark.profile_train_steps
  flops = benchmark._flops

  def recorded_lower(self, *args, **kwargs):
    lowered = lower(self, *args, **kwargs)
    lowered_refs.append(weakref.ref(lowered))
    _EVENTS.append(("lowered", None))
    return lowered

  def recorded_steps(*args, **kwargs):
    gc.collect()
    _EVENTS.append(("steps", sum(r() is not None for r in lowered_refs)))
    return blocked_steps(*args, **kwargs)

  def recorded_peak():
    value = len(_EVENTS) + 1  # Distinct per reading.
    _EVENTS.append(("peak", value))
    return value

  def recorded_profile(*args, **kwargs):
    _EVENTS.append(("profile", None))
    return profile(*args, **kwargs)

  def recorded_flops(compiled):
    _EVENTS.append(("flops", None))
    return flops(compiled)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(experiment.Experiment, "lower_train_step", recorded_lower)
    mp.setattr(benchmark, "blocked_steps", recorded_steps)
    mp.setattr(benchmark, "peak_rss_bytes", recorded_peak)
    mp.setattr(benchmark, "profile_train_steps", recorded_profile)
    mp.setattr(benchmark, "_flops", recorded_flops)
    return benchmark.run_benchmark(
        _tiny_config(), steps_list=(1, 2), train_iters=2, sample_repeats=3,
        matmul_size=64, conv_spatial=8, conv_channels=8, ceiling_repeats=5,
        profile_steps=1, peak_tflops=0.5,
        # The tiny config's own value: the variant is the same program, so
        # the two sides must give the same losses.
        alternate=["model.conv_impl=lax"], alternate_pairs=2,
    )


def test_training_peak_is_read_after_the_steps_before_the_analyses(results):
  # The profile and the FLOP count are the benchmark's own work: the
  # training peak is the reading taken between the timed steps and them.
  names = [name for name, _ in _EVENTS]
  steps = names.index("steps")
  peak = names.index("peak", steps)
  assert peak < names.index("profile") < names.index("flops")
  assert results["train"]["peak_rss_bytes"] == _EVENTS[peak][1]
  # The whole run's peak is read last.
  assert results["peak_rss_bytes"] == _EVENTS[-1][1]
  assert _EVENTS[-1][0] == "peak"


def test_no_lowered_step_is_held_while_the_steps_run(results):
  # A lowered step holds its compile's MLIR attributes (139 MiB on the
  # paper model): the benchmark keeps only its identity.
  names = [name for name, _ in _EVENTS]
  assert names.index("lowered") < names.index("steps")
  alive_at_steps = [alive for name, alive in _EVENTS if name == "steps"]
  assert alive_at_steps and set(alive_at_steps) == {0}
  assert len(results["train"]["program_sha256"]) == 64


def test_fit_linear_recovers_exact_line():
  steps = [1, 5, 10, 20, 50]
  times = [0.25 + 0.0125 * s for s in steps]
  a, b = benchmark.fit_linear(steps, times)
  np.testing.assert_allclose([a, b], [0.25, 0.0125], rtol=1e-9)
  with pytest.raises(ValueError, match="two distinct"):
    benchmark.fit_linear([3, 3], [1.0, 2.0])


def test_ceilings_of_a_bfloat16_run_are_the_bfloat16_kernels():
  ce = benchmark.measure_ceilings(matmul_size=32, conv_spatial=8,
                                  conv_channels=8, repeats=1,
                                  dtype="bfloat16")
  assert ce["ceiling_gflops"] == max(ce["matmul_bf16_gflops"],
                                     ce["conv_bf16_gflops"])
  assert ce["matmul_gflops"] > 0 and ce["conv_gflops"] > 0
  # float32 activations with bfloat16 products: the bfloat16 matmul beside
  # the float32 convolution (the figures are re-measured, so compare the
  # choice, not the values).
  mixed = benchmark.measure_ceilings(matmul_size=32, conv_spatial=8,
                                     conv_channels=8, repeats=1,
                                     matmul_precision="bfloat16")
  assert mixed["ceiling_gflops"] == max(mixed["matmul_bf16_gflops"],
                                        mixed["conv_gflops"])


def test_time_interleaved_takes_the_calls_in_turn():
  # Warm-up calls first, then each round calls every function once, in
  # order, so all of them are timed under the same load.
  order = []

  def call(name, seconds):
    def fn():
      order.append(name)
      time.sleep(seconds)
      return np.zeros(())
    return fn

  times = benchmark.time_interleaved(
      {"a": call("a", 0.0), "b": call("b", 0.02)}, repeats=3)
  assert order == ["a", "b"] + ["a", "b"] * 3
  assert [len(t) for t in times.values()] == [3, 3]
  assert min(times["b"]) >= 0.02 > max(times["a"])


def test_time_calls_measures_blocking_work():
  times = benchmark.time_calls(lambda: time.sleep(0.02), repeats=3)
  assert len(times) == 3
  assert min(times) >= 0.02


def test_results_have_every_field_and_consistent_values(results):
  # Survives a JSON round trip, as the CLI writes it.
  results = json.loads(json.dumps(results))
  ce, tr, sa = results["ceilings"], results["train"], results["sampling"]
  for key in ("matmul_gflops", "conv_gflops", "matmul_bf16_gflops",
              "conv_bf16_gflops", "ceiling_gflops"):
    assert ce[key] > 0
  # A float32 run is judged against the float32 kernels.
  assert ce["ceiling_gflops"] == max(ce["matmul_gflops"], ce["conv_gflops"])
  for key in ("lower_s", "compile_s", "init_s", "first_call_s",
              "startup_s", "step_time_s", "images_per_s", "flops_per_step",
              "achieved_gflops", "fraction_of_ceiling", "peak_rss_bytes"):
    assert tr[key] > 0, key
  assert len(tr["step_times_s"]) == 2
  for key in ("first_call_usage", "step_usage"):
    assert set(tr[key]) == {"user_s", "kernel_s", "page_faults"}, key
    assert min(tr[key].values()) >= 0, key
  assert tr["step_time_s"] == np.median(tr["step_times_s"])
  assert tr["step_time_min_s"] == min(tr["step_times_s"])
  # The step is lowered first, then init and compile overlap: start-up is
  # at least the lowering, the longer of the two and the first call.
  assert tr["startup_s"] >= tr["lower_s"] + max(
      tr["init_s"], tr["compile_s"]) + tr["first_call_s"] - 1e-3
  # The profiled step: every category present, shares summing to 1, and
  # the model's convolutions, matmuls and update all ran.
  profile = tr["op_profile"]
  assert set(profile["share"]) == set(op_profile.CATEGORIES)
  np.testing.assert_allclose(sum(profile["share"].values()), 1.0)
  for kind in ("conv forward", "conv input-grad", "conv weight-grad",
               "matmul", "optimizer"):
    assert profile["seconds"][kind] > 0, kind
  np.testing.assert_allclose(tr["images_per_s"], 2 / tr["step_time_s"])
  np.testing.assert_allclose(
      tr["achieved_gflops"], tr["flops_per_step"] / tr["step_time_s"] / 1e9)
  np.testing.assert_allclose(
      tr["fraction_of_ceiling"], tr["achieved_gflops"] / ce["ceiling_gflops"])
  # The MFU is against the given peak (0.5 TFLOP/s = 500 GFLOP/s).
  assert results["setup"]["peak_bf16_tflops"] == 0.5
  np.testing.assert_allclose(tr["mfu"], tr["achieved_gflops"] / 500.0)
  assert set(tr["memory"]) >= {"argument_bytes", "output_bytes", "temp_bytes"}
  assert tr["memory"]["argument_bytes"] > 0
  assert np.isfinite(tr["final_loss"])
  assert sa["encoder_s"] > 0 and sa["decoder_s"] > 0
  assert set(sa["predict_s"]) == {"1", "2"} == set(sa["predict_compile_s"])
  assert all(t > 0 for t in sa["predict_s"].values())
  # Two points: the fit passes through both.
  t1, t2 = sa["predict_s"]["1"], sa["predict_s"]["2"]
  np.testing.assert_allclose(sa["fit_b_s"], t2 - t1, atol=1e-12)
  np.testing.assert_allclose(sa["fit_a_s"], 2 * t1 - t2, atol=1e-12)
  assert sa["ratio_20_source"] == "fit"
  np.testing.assert_allclose(
      sa["ratio_20_steps"],
      (sa["fit_a_s"] + 20 * sa["fit_b_s"])
      / (sa["encoder_s"] + 20 * sa["decoder_s"]))
  assert results["setup"]["batch_size"] == 2
  ho = results["host_overhead"]
  assert ho["steps"] == 50 and 0 < ho["host_ms"] and 0 < ho["device_ms"]
  np.testing.assert_allclose(ho["host_ms"],
                             ho["handoff_ms"] + ho["tracker_ms"])
  # The parts issued per step never add up to more than the wall time.
  assert ho["host_ms"] + ho["dispatch_ms"] <= ho["wall_ms"] * 1.05
  assert results["peak_rss_bytes"] >= tr["peak_rss_bytes"]
  table = benchmark.format_table(results)
  assert "predict 2 steps" in table and "ratio at 20 steps" in table
  assert "host overhead" in table
  assert "conv weight-grad" in table and "train start-up" in table
  # The suite sets a compilation cache, so the step went through the trace
  # cache: written by whichever test lowered this config first, else read.
  assert tr["trace_cache"] in ("read from", "written to")
  assert f"lowered step {tr['trace_cache']} the trace cache" in table
  assert (f"{tr['first_call_usage']['page_faults']:,.0f} page faults"
          in table)
  assert f"{100 * tr['mfu']:.1f}% of the 0.5 TFLOP/s dense bf16 peak" in table


def test_process_usage_counts_the_pages_a_call_touches():
  # 64 MiB of fresh anonymous memory, one byte written per page: at least
  # one minor fault per page, and the pages' zeroing is kernel time.
  import mmap

  pages = 64 * 2**20 // mmap.PAGESIZE
  before = benchmark.process_usage()
  with mmap.mmap(-1, pages * mmap.PAGESIZE) as memory:
    np.frombuffer(memory, np.uint8)[::mmap.PAGESIZE] = 1
    after = benchmark.process_usage()
  touched = benchmark.usage_between(before, after)
  assert pages <= touched["page_faults"] < 2 * pages
  assert touched["kernel_s"] > 0 and touched["user_s"] >= 0
  per_call = benchmark.usage_between(before, after, calls=4)
  assert per_call["page_faults"] == touched["page_faults"] / 4


def test_peak_is_looked_up_by_device_kind_or_given():
  assert benchmark.peak_bf16_tflops("NVIDIA H200") == 989.4
  assert benchmark.peak_bf16_tflops("TPU v4") == 275.0
  # A CPU has no listed peak: no MFU unless the user gives one.
  assert benchmark.peak_bf16_tflops("cpu") is None
  assert benchmark.peak_bf16_tflops("cpu", 1.5) == 1.5
  assert benchmark.peak_bf16_tflops("NVIDIA H200", 700) == 700.0
  with pytest.raises(ValueError, match="--peak_tflops=0"):
    benchmark.peak_bf16_tflops("cpu", 0)


def test_compare_prints_each_figure_with_its_ratio(results):
  earlier = json.loads(json.dumps(results))
  earlier["train"]["step_time_s"] = 2 * results["train"]["step_time_s"]
  del earlier["sampling"]["predict_s"]["2"]
  lines = benchmark.compare(results, earlier).splitlines()
  row = {line[:26].strip(): line[26:].split() for line in lines[1:]}
  now, before, ratio = row["train step s (median)"]
  assert float(ratio) == pytest.approx(0.5, abs=1e-3)
  assert float(now) == pytest.approx(results["train"]["step_time_s"],
                                     rel=1e-3)
  assert row["predict 1 steps s"][2] == "1.000"
  assert row["predict 2 steps s"][1:] == ["n/a", "n/a"]
  assert "op s: conv weight-grad" in row
  assert float(row["first call page faults"][0]) == pytest.approx(
      results["train"]["first_call_usage"]["page_faults"], rel=1e-3)


def test_cli_reads_the_comparison_file_first_and_names_it(tmp_path):
  for content, message in (("{not json", "cannot read"),
                           ('{"setup": {}}', "no 'train' section")):
    path = tmp_path / "earlier.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"--compare={path}.*{message}"):
      benchmark._read_earlier(str(path))
  assert benchmark._parse_size("384,1248", "--image_size") == (384, 1248)
  assert benchmark._parse_size("64", "--image_size") == (64, 64)
  with pytest.raises(ValueError, match="--mask_size=a,b"):
    benchmark._parse_size("a,b", "--mask_size")


def test_flops_match_an_independently_lowered_step(results):
  # XLA's count for the benchmark's compiled step, checked against the count
  # of a separately lowered (unoptimised) step. Compiling it again would
  # double the test's run time; compilation rewrites a few ops, which moves
  # the count by about 1.4% on this model, hence the tolerance. A different
  # program (e.g. the forward pass alone) is off by far more.
  lowered = experiment.create(_tiny_config()).lower_train_step()
  np.testing.assert_allclose(
      results["train"]["flops_per_step"],
      lowered.cost_analysis()["flops"], rtol=0.05)


def _video_levers_config(**overrides):
  config = synthetic.get_config("tiny,video")
  config.model.update(NARROW_MODEL)
  config.input.batch_size = 2
  config.input.image_size = 32
  config.input.mask_size = 16
  config.remat = "both"
  config.grad_accum_steps = 2
  config.skip_nonfinite_updates = True
  config.input.frames_dropout = 0.5
  for key, value in overrides.items():
    config[key] = value
  return config


def test_benchmark_step_is_the_training_step_with_every_lever():
  # The benchmark times the program the training loop compiles: same
  # config -> same lowered program, remat, gradient accumulation,
  # non-finite skipping and video conditioning included; dropping a lever
  # changes the program, so the levers are really in it.
  config = _video_levers_config()
  results = benchmark.run_benchmark(
      config, steps_list=(1, 2), train_iters=1, sample_repeats=1,
      matmul_size=32, conv_spatial=8, conv_channels=8, ceiling_repeats=1,
      sampling=False, host_overhead=False,
  )
  assert "sampling" not in results and "host_overhead" not in results
  # The table of a train-only run (`--nosampling --nohost_overhead`) has
  # the train rows and none of the others.
  table = benchmark.format_table(results)
  assert "train step" in table and "peak host RSS" in table
  assert "encoder" not in table and "host overhead" not in table
  assert results["setup"]["video"] and results["setup"]["remat"] == "both"
  assert np.isfinite(results["train"]["final_loss"])

  def program(config):
    text = experiment.create(config).lower_train_step().as_text()
    return hashlib.sha256(text.encode()).hexdigest()

  assert results["train"]["program_sha256"] == program(config)
  for lever in (dict(remat="none"), dict(grad_accum_steps=1),
                dict(skip_nonfinite_updates=False)):
    assert program(_video_levers_config(**lever)) != program(config), lever


def test_alternate_steps_alternates_the_order_and_threads_the_states(
    monkeypatch):
  clock, calls = [0.0], []
  monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])

  def step(name, seconds):
    def run(state, increment):
      calls.append(name)
      clock[0] += seconds
      state = state + increment
      return state, {"loss": state * 0.5}
    return run

  state_a, state_b, timing = benchmark.alternate_steps(
      step("a", 2.0), jnp.float32(0), (1.0,), step("b", 1.5),
      jnp.float32(10), (2.0,), pairs=3)
  assert calls == ["a", "b", "b", "a", "a", "b"]
  assert float(state_a) == 3.0 and float(state_b) == 16.0
  assert timing["a_s"] == [2.0] * 3 and timing["b_s"] == [1.5] * 3
  assert timing["a_median_s"] == 2.0 and timing["b_median_s"] == 1.5
  assert timing["ratio"] == 0.75
  assert timing["difference_median_s"] == -0.5
  assert timing["b_faster_pairs"] == 3
  assert (timing["a_final_loss"], timing["b_final_loss"]) == (1.5, 8.0)
  with pytest.raises(ValueError, match="--alternate_pairs=0"):
    benchmark.alternate_steps(step("a", 1), 0, (), step("b", 1), 0, (),
                              pairs=0)


def test_alternate_variant_of_the_same_program_gives_the_same_losses(
    results):
  al = results["alternate"]
  assert al["overrides"] == ["model.conv_impl=lax"]
  assert al["same_program"]
  assert al["pairs"] == 2 and len(al["a_s"]) == len(al["b_s"]) == 2
  assert al["a_median_s"] == pytest.approx(np.median(al["a_s"]))
  assert al["b_median_s"] == pytest.approx(np.median(al["b_s"]))
  wins = sum(b < a for a, b in zip(al["a_s"], al["b_s"], strict=True))
  assert al["b_faster_pairs"] == wins
  # Both from the same initial state, batch and key, through the same
  # program: the same loss after the same number of steps.
  assert al["a_final_loss"] == al["b_final_loss"]
  assert np.isfinite(al["a_final_loss"])
  table = benchmark.format_table(results)
  assert "alternated with     model.conv_impl=lax (the same program)" in (
      table)
  assert f"of {al['pairs']} pairs" in table


def test_alternate_config_overrides_and_refuses_what_cannot_alternate():
  config = _tiny_config()
  variant = benchmark.alternate_config(
      config, ["model.conv_impl=tiled", "remat=blocks"])
  assert (variant.model.conv_impl, variant.remat) == ("tiled", "blocks")
  assert (config.model.conv_impl, config.remat) == ("lax", "none")
  # Read once per process: both values cannot run in one.
  for field in benchmark.PROCESS_WIDE_FIELDS:
    with pytest.raises(config_lib.ConfigError,
                       match=f"--alternate={field}=.*--compare"):
      benchmark.alternate_config(config, [f"{field}=x"])
  with pytest.raises(config_lib.ConfigError,
                     match="--alternate=model.nope=1: the config has no "
                           "field model.nope"):
    benchmark.alternate_config(config, ["model.nope=1"])
  # The variant is validated like any config.
  with pytest.raises(config_lib.ConfigError, match="conv_impl"):
    benchmark.alternate_config(config, ["model.conv_impl=winograd"])


def test_start_up_row_without_the_trace_cache():
  assert benchmark._trace_cache_text(None) == ""
  assert benchmark._trace_cache_text("read from") == (
      ", lowered step read from the trace cache")

