"""What the entry points import at start-up.

Every training and prediction process loads the evaluator and source
registries. scipy (DAVIS J&F) and tensorflow_datasets (the TFDS sources)
are imported when a score is computed or a TFDS split is opened, not at
start-up, where they cost each process about 1 s; TensorFlow never is.
The scores and sources that use them are tested in test_davis_eval.py and
test_tfds_sources.py.
"""

import json
import subprocess
import sys

_LIST_MODULES = r"""
import json, sys
from pix2seq_d_jax import main, predict, train
from pix2seq_d_jax import data, evaluators
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_entry_points_import_no_scipy_tfds_or_tensorflow():
  out = subprocess.run([sys.executable, "-c", _LIST_MODULES],
                       capture_output=True, text=True, check=True)
  loaded = set(json.loads(out.stdout.splitlines()[-1]))
  # The registries did load (the check is not of an empty import).
  assert {"pix2seq_d_jax", "jax", "flax", "grain", "orbax"} <= loaded
  assert not loaded & {"scipy", "tensorflow_datasets", "tensorflow"}, (
      loaded & {"scipy", "tensorflow_datasets", "tensorflow"})
