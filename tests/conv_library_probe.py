"""Runs one convolution under one XLA:CPU convolution library; prints JSON.

Run by `test_xla_env.py` in its own process, because XLA reads `XLA_FLAGS`
once per process: `xla_env.set_cpu_convolutions(argv[1])` runs before jax
creates its backend, as in the entry points. Prints the names of the
operations a profile of the forward convolution records (YNNPACK's run as
`ynn_fusion`, Eigen's under the convolution's own name), the library
`xla_env.cpu_convolution_library` reads from the flags, and the
convolution's output and gradients for the inputs of `conv_inputs`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from pix2seq_d_jax import op_profile, xla_env  # noqa: E402

# Large enough that XLA:CPU hands the convolution to YNNPACK by default.
SHAPE, KERNEL = (2, 32, 32, 32), (3, 3, 32, 32)


def conv_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Input, kernel and output cotangent (float32, fixed seed)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(SHAPE, dtype=np.float32)
  kernel = rng.standard_normal(KERNEL, dtype=np.float32) / 17
  cotangent = rng.standard_normal(SHAPE, dtype=np.float32)
  return x, kernel, cotangent


def conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


if __name__ == "__main__":
  # Importing jax does not read XLA_FLAGS; creating its backend does.
  changed = xla_env.set_cpu_convolutions(sys.argv[1])
  x, kernel, cotangent = conv_inputs()
  forward = jax.jit(conv)
  y = forward(x, kernel).block_until_ready()
  names = op_profile.traced_op_times(
      lambda: forward(x, kernel).block_until_ready(), repeats=1)
  dx, dk = jax.jit(jax.grad(
      lambda x, k: jnp.vdot(conv(x, k), cotangent), (0, 1)))(x, kernel)
  print(json.dumps({"changed": changed,
                    "library": xla_env.cpu_convolution_library(),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "op_names": sorted(names), "y": np.asarray(y).tolist(),
                    "dx": np.asarray(dx).tolist(),
                    "dk": np.asarray(dk).tolist()}))
