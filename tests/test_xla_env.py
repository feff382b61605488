"""`xla_env.set_cpu_scheduler`: the XLA_FLAGS it writes and their effect.

The effect is checked in fresh processes (XLA reads its flags once per
process, `tests/xla_env_probe.py`): the memory scheduler needs less
temporary memory for independent matmul chains than XLA:CPU's
concurrency-optimised one, and the same train steps give the same losses
and parameters under both, to the bit.
"""

import json
import os
import subprocess
import sys

import pytest

from pix2seq_d_jax import config_lib, xla_env

HERE = os.path.dirname(os.path.abspath(__file__))
FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


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


def test_bad_names_are_refused(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  with pytest.raises(ValueError, match="cpu_scheduler='fast'"):
    xla_env.set_cpu_scheduler("fast")
  assert "XLA_FLAGS" not in os.environ
  from configs import synthetic

  config = synthetic.get_config("tiny")
  config.cpu_scheduler = "fast"
  with pytest.raises(config_lib.ConfigError, match="cpu_scheduler"):
    config_lib.validate(config)


def test_memory_scheduler_lowers_temporaries_and_keeps_the_numbers():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = {s: subprocess.Popen(
      [sys.executable, os.path.join(HERE, "xla_env_probe.py"), s],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for s in xla_env.CPU_SCHEDULERS}
  out = {}
  for s, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    out[s] = json.loads(stdout.strip().splitlines()[-1])
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
