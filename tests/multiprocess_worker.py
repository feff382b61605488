"""One process of a multi-process CPU training run, for test_multiprocess.py.

  python tests/multiprocess_worker.py OUT_DIR DATA_DIR \
      [COORDINATOR NUM_PROCESSES PROCESS_ID]

With the last three arguments the process joins a `jax.distributed` job on
loopback (one CPU device per process); without them it runs alone. Either
way it builds the tiny model's sharded state with `experiment.create`, trains
3 steps on FIXED seeded global batches of which this process feeds only its
rows (through `sharding.global_batch`), blocking every step (queued CPU
steps with collectives deadlock), then reads one epoch of its training data
shard. It writes
`params_<i>.npz` (its replica of the parameters, keyed by tree path) and
`result_<i>.json` (losses, image ids read, process and device counts).
Run with JAX_PLATFORMS=cpu and the repository root on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np

from configs import synthetic
from pix2seq_d_jax import experiment
from pix2seq_d_jax.data import pipeline

if TYPE_CHECKING:
  import pytest

BATCH, STEPS = 4, 3
# `synthetic.py:tiny` cut to a skeleton (one backbone stage, no encoder or
# decoder transformer layers, one decoder level) so that cold compiles take
# seconds: these tests check plumbing across processes, not the model.
NARROW_MODEL = dict(
    backbone_width=8, backbone_depths=(1,), enc_layers=0, enc_dim=32,
    enc_mlp_dim=64, fuse_dim=16, dec_dim=16, dec_dim_mults=(1,),
    dec_transformer_layers=0, dec_transformer_dim=32,
)


def narrow_model_flags() -> list[str]:
  """NARROW_MODEL as `--config.model.*` overrides of the entry point."""
  return [f"--config.model.{k}={v}".replace(" ", "")
          for k, v in NARROW_MODEL.items()]


def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """One persistent compilation cache for a pytest session.

  The scale-out tests compile a few identical programs in workers, in the
  entry point and in-process (same config, same jit); sharing the cache
  compiles each once per session, whichever test runs first.
  """
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # The suite's (conftest).
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  path = tmp_path_factory.getbasetemp() / "scaleout_jax_cache"
  path.mkdir(exist_ok=True)
  return str(path)


def make_config() -> ml_collections.ConfigDict:
  """The tiny synthetic config with NARROW_MODEL, 2 steps as in the test."""
  config = synthetic.get_config("tiny")
  config.model.update(NARROW_MODEL)
  config.input.batch_size = BATCH
  config.total_steps = 2  # Only the lr schedule's length.
  return config


def global_batch_rows(
    step: int, config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
  """The whole global batch of `step`, identical in every process."""
  s, m = config.input.image_size, config.input.mask_size
  rng = np.random.default_rng([7, step])
  sem = rng.integers(0, 5, (BATCH, m, m)).astype(np.int32)
  return {
      "image": rng.uniform(size=(BATCH, s, s, 3)).astype(np.float32),
      "semantic": sem,
      "instance": np.where(sem > 2, rng.integers(1, 4, sem.shape), 0).astype(
          np.int32),
      "loss_weight": rng.uniform(0.5, 1.5, (BATCH, m, m)).astype(np.float32),
  }


def train_steps(
    config: ml_collections.ConfigDict,
) -> tuple[list[float], dict[str, np.ndarray]]:
  """STEPS steps on fixed batches; returns losses and local params."""
  exp = experiment.create(config)
  mesh = exp.mesh
  state = exp.init_state(jax.random.key(0))
  # The training loop's own jitted step, so the persistent cache can share
  # the compiled program with the entry point's runs of the same config.
  step_fn = exp.train_step
  local = BATCH // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  losses = []
  for step in range(STEPS):
    whole = global_batch_rows(step, config)
    batch = exp.global_batch({k: v[rows] for k, v in whole.items()})
    with jax.set_mesh(mesh):
      state, metrics = step_fn(state, batch, jax.random.key(1))
    losses.append(float(jax.device_get(metrics["loss"])))
  flat, _ = jax.tree_util.tree_flatten_with_path(state.params)
  params = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
            for path, leaf in flat}
  return losses, params


def epoch_image_ids(
    config: ml_collections.ConfigDict, data_dir: str
) -> list[int]:
  """Image ids of one epoch of this process's training shard.

  The source and preprocessing are the training loop's
  (`experiment.make_source`, `experiment.train_preprocess_fn`).
  """
  config = config.copy_and_resolve_references()
  config.input.data_dir = data_dir
  source = experiment.make_source(config, config.input.train_split)
  preprocess_fn = experiment.train_preprocess_fn(config)
  local = BATCH // jax.process_count()
  # Shard index and count default to this process's, as in training.
  loader = pipeline.make_train_loader(
      source, batch_size=local, seed=config.seed, preprocess_fn=preprocess_fn
  )
  batches = len(source) // jax.process_count() // local
  return [int(i) for _ in range(batches) for i in next(loader)["image_id"]]


def main(argv: list[str]) -> None:
  out_dir, data_dir = argv[1], argv[2]
  if len(argv) == 6:
    jax.distributed.initialize(argv[3], num_processes=int(argv[4]),
                               process_id=int(argv[5]))
  jax.config.update("jax_threefry_partitionable", True)
  jax.config.update("jax_disable_most_optimizations", True)
  config = make_config()
  losses, params = train_steps(config)
  image_ids = epoch_image_ids(config, data_dir)
  i = jax.process_index()
  np.savez(os.path.join(out_dir, f"params_{i}.npz"), **params)
  with open(os.path.join(out_dir, f"result_{i}.json"), "w") as f:
    json.dump(dict(losses=losses, image_ids=image_ids,
                   process_count=jax.process_count(),
                   device_count=jax.device_count()), f)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("worker done")


if __name__ == "__main__":
  main(sys.argv)
