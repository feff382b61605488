"""One train step on 8 fake devices equals the 1-device step.

Data parallel (the default rules), FSDP, a 2-D data x fsdp mesh and tensor
parallel (data x model) are config changes only (`mesh`, `sharding_rules`);
each must give the same loss and parameters as a single device, the batch
and the named weights and activations must be sharded as the rules say,
and a checkpoint written with 8-way sharded parameters must restore on one
device.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ckpt8"))
  # The script adds the 8 fake devices to the suite's XLA_FLAGS.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, "multidevice_step.py"), workdir],
      capture_output=True, text=True, timeout=900, env=env,
      cwd=os.path.dirname(HERE))
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", ["dp", "fsdp", "data_x_fsdp", "tp"])
def test_sharded_step_equals_single_device(results, mesh):
  r = results[mesh]
  assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6)
  assert r["max_param_diff"] < 1e-5


def test_rules_decide_the_parameter_sharding(results):
  # Data parallel: replicated weights.
  assert "fsdp" not in results["dp"]["conv_out_spec"]
  assert results["dp"]["conv_out_shard_shape"] == results["dp"][
      "conv_out_shape"]
  # FSDP: ('conv_out' -> fsdp) splits the kernel's last axis 8 ways.
  fsdp = results["fsdp"]
  assert fsdp["conv_out_spec"].endswith("None, None, None, 'fsdp')")
  assert fsdp["conv_out_shard_shape"][-1] * 8 == fsdp["conv_out_shape"][-1]
  mixed = results["data_x_fsdp"]
  assert mixed["conv_out_shard_shape"][-1] * 4 == mixed["conv_out_shape"][-1]


@pytest.mark.parametrize("mesh, batch, stem, mlp, constraints", [
    # The default rules, ('batch', ('data', 'fsdp')), on a `data` mesh.
    ("dp", "P('data',)", "P(None, None, None, None)", "P(None, None)",
     ["data"]),
    ("fsdp", "P('fsdp',)", "P(None, None, None, 'fsdp')", "P('fsdp', None)",
     ["fsdp"]),
    ("data_x_fsdp", "P(('data', 'fsdp'),)", "P(None, None, None, 'fsdp')",
     "P('fsdp', None)", ["data", "fsdp"]),
    # Tensor parallel: MLP hidden units and conv outputs over `model`.
    ("tp", "P('data',)", "P(None, None, None, 'model')", "P(None, 'model')",
     ["data", "model"]),
])
def test_rules_decide_batch_weight_and_activation_shardings(
    results, mesh, batch, stem, mlp, constraints):
  r = results[mesh]
  assert r["batch_spec"] == batch
  assert r["stem_spec"] == stem
  assert r["mlp_spec"] == mlp
  # Activation constraints name exactly the mesh axes the rules give them.
  assert r["constraint_axes"] == constraints


def test_tensor_parallel_splits_conv_outputs_over_model(results):
  tp = results["tp"]
  assert tp["conv_out_spec"] == "P(None, None, None, 'model')"
  assert tp["conv_out_shard_shape"][-1] * 4 == tp["conv_out_shape"][-1]


def test_checkpoint_from_8_devices_restores_on_1(results):
  r = results["restore_8_to_1"]
  assert r["num_devices"] == 1
  assert r["max_param_diff"] == 0.0
