"""Compiles two programs under one XLA:CPU scheduler; prints a JSON line.

Run by `test_xla_env.py` in its own process, because XLA reads `XLA_FLAGS`
once per process: `xla_env.set_cpu_scheduler(argv[1])` runs before jax
creates its backend, as in the entry points. Prints the temporary memory of
eight independent three-matmul chains (the concurrency-optimised order
keeps all chains' intermediates alive) and the loss and a parameter
checksum before and after three train steps of the narrow tiny model.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pix2seq_d_jax import xla_env  # noqa: E402

changed = xla_env.set_cpu_scheduler(sys.argv[1])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import synthetic  # noqa: E402
from pix2seq_d_jax import benchmark, experiment  # noqa: E402
from tests.multiprocess_worker import NARROW_MODEL  # noqa: E402


def chains(x, ws):
  total = 0.0
  for w in ws:
    h = x
    for _ in range(3):
      h = jnp.tanh(h @ w)
    total = total + jnp.sum(h)
  return total


spec = jax.ShapeDtypeStruct
chain_temp = jax.jit(jax.grad(chains)).lower(
    spec((256, 512), jnp.float32), [spec((512, 512), jnp.float32)] * 8
).compile().memory_analysis().temp_size_in_bytes

config = synthetic.get_config("tiny")
config.model.update(NARROW_MODEL)
config.input.batch_size = 2
config.optax.lr = 1e-2
config.optax.warmup_steps = 0
exp = experiment.create(config, total_steps=3)
compiled = exp.compile_train_step()
state = exp.init_state(jax.random.key(0))


def _checksum(params):
  return float(sum(np.abs(np.asarray(x, np.float64)).sum()
                   for x in jax.tree.leaves(params)))


initial = _checksum(state.params)
batch = exp.global_batch(benchmark.random_batch(
    exp.batch_spec(), num_classes=2**config.diffusion.bits_per_channel,
    max_instances=config.input.max_instances, seed=0))
losses = []
for i in range(3):
  state, metrics = compiled(state, batch, jax.random.key(i))
  losses.append(float(metrics["loss"]))
print(json.dumps({"changed": changed, "xla_flags": os.environ["XLA_FLAGS"],
                  "chain_temp_bytes": chain_temp, "losses": losses,
                  "initial_checksum": initial,
                  "param_checksum": _checksum(state.params)}))
