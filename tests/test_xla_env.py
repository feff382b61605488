"""`xla_env`: the XLA_FLAGS it writes and their effect.

The effect is checked in fresh processes (XLA reads its flags once per
process, `tests/xla_env_probe.py`): the memory scheduler needs less
temporary memory for independent matmul chains than XLA:CPU's
concurrency-optimised one, and the same train steps give the same losses
and parameters under both, to the bit; with `cpu_convolutions` 'eigen' a
convolution runs outside YNNPACK (`tests/conv_library_probe.py`), and both
libraries' values and gradients match a float64 reference. Copy
insertion's region analysis, given to one compile, drops copies from the
random numbers' loops and keeps their values; XLA's CPU runtime flushes
subnormal results whether or not the kernels are compiled for it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pix2seq_d_jax import config_lib, xla_env

HERE = os.path.dirname(os.path.abspath(__file__))
FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
REGION_FLAG = "--xla_cpu_copy_insertion_use_region_analysis"
FTZ_FLAG = "--xla_cpu_ftz"


@pytest.mark.parametrize("scheduler,value", [("memory", "false"),
                                             ("concurrency", "true")])
def test_sets_the_flag_and_keeps_the_others(monkeypatch, scheduler, value):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
  assert xla_env.set_cpu_scheduler(scheduler)
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_cpu_use_thunk_runtime=true", f"{FLAG}={value}"]
  # Once set, it is not added twice.
  assert not xla_env.set_cpu_scheduler(scheduler)
  assert os.environ["XLA_FLAGS"].count(FLAG) == 1


def test_the_users_flag_wins(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"{FLAG}=true")
  assert not xla_env.set_cpu_scheduler("memory")
  assert os.environ["XLA_FLAGS"] == f"{FLAG}=true"
  monkeypatch.delenv("XLA_FLAGS")
  assert xla_env.set_cpu_scheduler("memory")
  assert os.environ["XLA_FLAGS"] == f"{FLAG}=false"


@pytest.mark.parametrize("field,setter", [
    ("cpu_scheduler", xla_env.set_cpu_scheduler),
    ("cpu_convolutions", xla_env.set_cpu_convolutions)])
def test_bad_names_are_refused(monkeypatch, field, setter):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  with pytest.raises(ValueError, match=f"{field}='fast'"):
    setter("fast")
  assert "XLA_FLAGS" not in os.environ
  from configs import synthetic

  config = synthetic.get_config("tiny")
  config[field] = "fast"
  with pytest.raises(config_lib.ConfigError, match=field):
    config_lib.validate(config)


def _run_probes(script: str, choices) -> dict:
  """{choice: the JSON line `script choice` prints}, in fresh processes
  (side by side) without the suite's `XLA_FLAGS`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = {c: subprocess.Popen(
      [sys.executable, os.path.join(HERE, script), c],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for c in choices}
  out = {}
  for c, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    out[c] = json.loads(stdout.strip().splitlines()[-1])
  return out


def test_memory_scheduler_lowers_temporaries_and_keeps_the_numbers():
  out = _run_probes("xla_env_probe.py", xla_env.CPU_SCHEDULERS)
  memory, concurrency = out["memory"], out["concurrency"]
  assert memory["xla_flags"] == f"{FLAG}=false"
  assert concurrency["xla_flags"] == f"{FLAG}=true"
  # Eight chains' intermediates alive at once against about one chain's.
  assert memory["chain_temp_bytes"] * 2 <= concurrency["chain_temp_bytes"]
  # Only the order of operations differs: the same numbers, bit for bit.
  assert memory["losses"] == concurrency["losses"]
  assert len(set(memory["losses"])) == 3  # The steps did train.
  assert memory["param_checksum"] == concurrency["param_checksum"]
  assert memory["param_checksum"] != memory["initial_checksum"]


CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_eigen_convolutions_flag(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
  assert xla_env.set_cpu_convolutions("eigen")
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_cpu_use_thunk_runtime=true",
      f"{CONV_FLAG}=-individual_convolution"]
  assert not xla_env.set_cpu_convolutions("eigen")
  assert os.environ["XLA_FLAGS"].count(CONV_FLAG) == 1


def test_ynnpack_and_the_users_fusion_types_leave_the_flags_alone(
    monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"{CONV_FLAG}=-reduce")
  assert not xla_env.set_cpu_convolutions("eigen")
  assert os.environ["XLA_FLAGS"] == f"{CONV_FLAG}=-reduce"
  monkeypatch.delenv("XLA_FLAGS")
  assert not xla_env.set_cpu_convolutions("ynnpack")
  assert "XLA_FLAGS" not in os.environ


@pytest.mark.parametrize("flags, library", [
    ("", "ynnpack"),  # XLA's default list has individual_convolution.
    ("--xla_cpu_use_thunk_runtime=true", "ynnpack"),
    (f"{CONV_FLAG}=-individual_convolution", "eigen"),
    (f"{CONV_FLAG}=-reduce", "ynnpack"),
    (f"{CONV_FLAG}=+eltwise,-individual_convolution", "eigen"),
    # Exact names replace the default list.
    (f"{CONV_FLAG}=dot,individual_convolution", "ynnpack"),
    (f"{CONV_FLAG}=dot,reduce", "eigen"),
    (f"{CONV_FLAG}=", "eigen"),  # YNNPACK off altogether.
    # Several flags apply in turn (each case as XLA compiled a 3x3
    # 128->128 convolution on 2 x 64 x 64 maps, jax 0.10.2).
    (f"{CONV_FLAG}=-individual_convolution {CONV_FLAG}=-reduce", "eigen"),
    (f"{CONV_FLAG}=-reduce {CONV_FLAG}=-individual_convolution", "eigen"),
    (f"{CONV_FLAG}=dot {CONV_FLAG}=-individual_convolution", "eigen"),
    (f"{CONV_FLAG}=-reduce {CONV_FLAG}=dot,individual_convolution",
     "ynnpack"),
    (f"{CONV_FLAG}=individual_convolution {CONV_FLAG}=dot", "eigen"),
    (f"{CONV_FLAG}=-individual_convolution "
     f"{CONV_FLAG}=+individual_convolution", "ynnpack"),
])
def test_cpu_convolution_library_reads_the_fusion_types(flags, library):
  assert xla_env.cpu_convolution_library(flags) == library


def test_cpu_convolution_library_reads_the_environment(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_env.cpu_convolution_library() == "ynnpack"
  assert xla_env.set_cpu_convolutions("eigen")
  assert xla_env.cpu_convolution_library() == "eigen"


def test_set_xla_flags_applies_the_configs_choices(monkeypatch):
  from configs import synthetic

  monkeypatch.delenv("XLA_FLAGS", raising=False)
  config = synthetic.get_config("tiny")
  xla_env.set_xla_flags(config)  # The defaults: memory, eigen.
  assert os.environ["XLA_FLAGS"].split() == [
      f"{FLAG}=false", f"{CONV_FLAG}=-individual_convolution",
      f"{REGION_FLAG}=true", f"{FTZ_FLAG}=true"]
  monkeypatch.delenv("XLA_FLAGS")
  config.cpu_scheduler, config.cpu_convolutions = "concurrency", "ynnpack"
  xla_env.set_xla_flags(config)
  assert os.environ["XLA_FLAGS"].split() == [
      f"{FLAG}=true", f"{REGION_FLAG}=true", f"{FTZ_FLAG}=true"]


def test_the_users_setting_of_a_default_flag_wins(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"{FTZ_FLAG}=false")
  assert xla_env.set_cpu_defaults() == [f"{REGION_FLAG}=true"]
  assert os.environ["XLA_FLAGS"].split() == [f"{FTZ_FLAG}=false",
                                             f"{REGION_FLAG}=true"]
  assert xla_env.set_cpu_defaults() == []  # Both there now.


def test_region_analysis_drops_loop_copies_and_keeps_the_values():
  """The option the flag sets, given to one compile: the random numbers'
  rolled loops keep fewer copies, and the values are the same to the bit."""
  import jax
  import jax.numpy as jnp

  def dropout_and_noise(key, x):
    keep_key, noise_key = jax.random.split(key)
    keep = jax.random.bernoulli(keep_key, 0.9, x.shape)
    return (jnp.where(keep, x / 0.9, 0.0)
            + jax.random.normal(noise_key, x.shape))

  x = jnp.linspace(-1.0, 1.0, 2 * 64 * 128).reshape(2, 64, 128)
  lowered = jax.jit(dropout_and_noise).lower(jax.random.key(3), x)
  plain = lowered.compile()
  region = lowered.compile(compiler_options={
      REGION_FLAG.removeprefix("--"): True})

  def copies(compiled):
    return sum(" copy(" in line for line in compiled.as_text().splitlines())

  assert copies(region) < copies(plain)
  np.testing.assert_array_equal(np.asarray(region(jax.random.key(3), x)),
                                np.asarray(plain(jax.random.key(3), x)))


def test_flushed_subnormals_are_what_the_runtime_computes_already():
  """`--xla_cpu_ftz` compiles for subnormal results flushed to zero, which
  XLA's CPU runtime does with or without it: the flag changes no value."""
  import jax
  import jax.numpy as jnp

  x = jnp.asarray([2e-38, 1e-30, -3e-38, -90.0, 0.0], jnp.float32)
  lowered = jax.jit(lambda x: (x * 0.25, jnp.exp(x))).lower(x)
  plain = lowered.compile()(x)
  flushed = lowered.compile(compiler_options={
      FTZ_FLAG.removeprefix("--"): True})(x)
  tiny = np.finfo(np.float32).tiny
  for got in (plain, flushed):
    scaled, exp = map(np.asarray, got)
    # 5e-39 and exp(-90) = 8e-40 are subnormal: both come out as zeros.
    np.testing.assert_array_equal(scaled, np.asarray(
        [0.0, np.float32(1e-30) * np.float32(0.25), -0.0, -22.5, 0.0],
        np.float32))
    assert exp[3] == 0.0 and exp[4] == 1.0
    assert not np.any((np.abs(scaled) > 0) & (np.abs(scaled) < tiny))
  for a, b in zip(plain, flushed, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _numpy_conv(x, kernel):
  """3×3 'SAME' NHWC convolution in float64: a sum over the nine taps."""
  x = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1] - 2, x.shape[2] - 2
  return sum(np.einsum("nhwc,co->nhwo", x[:, i:i + h, j:j + w],
                       kernel[i, j].astype(np.float64))
             for i in range(3) for j in range(3))


def test_each_library_runs_the_convolutions_with_the_same_values():
  from tests import conv_library_probe

  out = _run_probes("conv_library_probe.py", xla_env.CPU_CONVOLUTIONS)
  eigen, ynnpack = out["eigen"], out["ynnpack"]
  assert eigen["changed"] and not ynnpack["changed"]
  # What the tiled convolutions read agrees with what XLA did.
  assert eigen["library"] == "eigen" and ynnpack["library"] == "ynnpack"
  # Which library ran the convolution: YNNPACK's fusion, or Eigen's
  # convolution under its instruction's name.
  assert "ynn_fusion" in ynnpack["op_names"]
  assert not any(n.startswith("ynn_fusion") for n in eigen["op_names"])
  assert any(n.startswith("conv_general_dilated") for n in eigen["op_names"])
  # The values agree with a float64 reference (and so with each other).
  x, kernel, cotangent = conv_library_probe.conv_inputs()
  y = _numpy_conv(x, kernel)
  # d<y, c>/dx is the convolution of c with the flipped, transposed kernel.
  dx = _numpy_conv(cotangent, kernel[::-1, ::-1].transpose(0, 1, 3, 2))
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  dk = np.stack([np.stack([
      np.einsum("nhwc,nhwo->co", xp[:, i:i + 32, j:j + 32], cotangent)
      for j in range(3)]) for i in range(3)])
  for result in (eigen, ynnpack):
    for name, want in (("y", y), ("dx", dx), ("dk", dk)):
      np.testing.assert_allclose(np.asarray(result[name]), want,
                                 rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                 err_msg=name)
