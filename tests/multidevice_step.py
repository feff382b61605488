"""Runs one train step on 8 fake CPU devices under several meshes.

Executed by `test_sharding_multidevice.py` in its own process, because
`--xla_force_host_platform_device_count` must be set before jax is imported.
Prints one JSON object: per mesh, the loss, the max parameter difference
to the 1-device run, how the batch, the stem kernel, a decoder kernel and an
encoder MLP kernel are sharded, and which mesh axes the activation
constraints of the lowered step name. Every layout comes from `mesh` and
`sharding_rules` alone.
"""

import json
import os
import sys

# Added to the suite's XLA_FLAGS (its fast-compile flag stays).
os.environ["XLA_FLAGS"] = " ".join(
    [*os.environ.get("XLA_FLAGS", "").split(),
     "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Plumbing, not XLA's code quality, is under test: compile faster.
jax.config.update("jax_disable_most_optimizations", True)
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from pix2seq_d_jax import (  # noqa: E402
    checkpointing,
    experiment,
    sharding,
)
from pix2seq_d_jax.diffusion import losses  # noqa: E402

IMAGE, MASK, BATCH = 32, 16, 8
# The loss reads the [8, 16, 16, 512] logits in 4 blocks of 4 rows (on CPU
# the default block, a few MiB, would hold them whole), so the blocked loss
# and its custom VJP run under every mesh and must give the 1-device result.
losses.BLOCK_BYTES = BATCH * 4 * MASK * 512 * 4
DEFAULT_RULES = list(common.get_base_config().sharding_rules)
FSDP_RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"),
              ("conv_out", "fsdp")]
# Tensor parallel: MLP hidden units, attention heads and conv output
# channels (weights and activations) over `model`, the batch over `data`.
TP_RULES = [("batch", "data"), ("mlp", "model"), ("heads", "model"),
            ("conv_out", "model")]
MESHES = {
    "single": ([("data", 1)], DEFAULT_RULES, 1),
    "dp": ([("data", 8)], DEFAULT_RULES, 8),
    "fsdp": ([("fsdp", 8)], FSDP_RULES, 8),
    "data_x_fsdp": ([("data", 2), ("fsdp", 4)], FSDP_RULES, 8),
    "tp": ([("data", 2), ("model", 4)], TP_RULES, 8),
}


def _config():
  config = common.get_base_config()
  config.model = common.tiny_model()
  # Small, but with every weight kind the rules name: one encoder
  # transformer block (embed, mlp, heads), convolutions (conv_out).
  config.model.update(backbone_width=8, backbone_depths=(1,), enc_layers=1,
                      enc_dim=32, enc_mlp_dim=64, enc_heads=2, fuse_dim=16,
                      dec_dim=16, dec_dim_mults=(1,),
                      dec_transformer_layers=0, dec_transformer_dim=32,
                      dec_heads=2, enc_dropout=0.0)
  config.input.image_size, config.input.mask_size = IMAGE, MASK
  return config


def _batch():
  rng = np.random.default_rng(0)
  sem = rng.integers(0, 4, (BATCH, MASK, MASK)).astype(np.int32)
  return {
      "image": rng.uniform(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
      "semantic": sem,
      "instance": np.where(sem > 1, sem + 2, 0).astype(np.int32),
      "loss_weight": np.ones((BATCH, MASK, MASK), np.float32),
  }


def run(mesh_config, rules, num_devices, workdir=None):
  config = _config()
  config.sharding_rules = rules
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:num_devices])
  exp = experiment.create(config, mesh, total_steps=10)
  state = exp.init_state(jax.random.key(0))
  step = exp.train_step
  batch = sharding.global_batch(_batch(), mesh, rules)
  # The activation constraints' mesh axes, read from the lowered step.
  text = step.lower(state, batch, jax.random.key(1)).as_text()
  constraint_axes = sorted({
      axis for line in text.splitlines() if "sharding_constraint" in line
      for axis in mesh.axis_names if f'"{axis}"' in line})
  state, metrics = step(state, batch, jax.random.key(1))
  jax.block_until_ready(metrics)
  if workdir is not None:
    manager = checkpointing.make_manager(workdir, keep=1)
    checkpointing.save(manager, 1, state, None, force=True)
    manager.wait_until_finished()
    manager.close()
  params = jax.tree.map(np.asarray, state.params)
  stem = state.params["backbone"]["stem_conv"]["kernel"]
  mlp = state.params["encoder"]["transformer"]["block_0"]["mlp"]["dense1"][
      "kernel"]
  specs = dict(stem_spec=str(stem.sharding.spec),
               mlp_spec=str(mlp.sharding.spec),
               batch_spec=str(batch["image"].sharding.spec),
               constraint_axes=constraint_axes)
  return float(metrics["loss"]), params, specs, state


def main():
  workdir = sys.argv[1]
  out = {}
  ref_loss, ref_params, _, _ = run(*MESHES["single"])
  fsdp_params = None
  for name, (mesh_config, rules, n) in MESHES.items():
    if name == "single":
      continue
    save_to = workdir if name == "fsdp" else None
    loss, params, specs, state = run(mesh_config, rules, n, save_to)
    if name == "fsdp":
      fsdp_params = params
    diff = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), params, ref_params)))
    leaf = state.params["decoder"]["conv_out"]["kernel"]
    out[name] = dict(loss=loss, ref_loss=ref_loss, max_param_diff=diff,
                     **specs,
                     conv_out_spec=str(leaf.sharding.spec),
                     conv_out_shard_shape=list(
                         leaf.addressable_shards[0].data.shape),
                     conv_out_shape=list(leaf.shape))
  # A checkpoint written with params sharded over 8 devices restores on 1.
  mesh1 = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  exp1 = experiment.create(_config(), mesh1, total_steps=10)
  abstract = exp1.abstract_state
  restored = checkpointing.restore_weights(workdir, abstract)
  diff = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - b).max()),
      restored.params, fsdp_params)))
  out["restore_8_to_1"] = dict(
      max_param_diff=diff, num_devices=len(
          restored.params["decoder"]["conv_out"]["kernel"].devices()))
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
