"""Bad inputs found after start-up, through the real entry points.

A workdir another run holds, a `model_init` file that is no ResNet-50
export, and a checkpoint of another model config (resumed by `main`, read by
`predict`): each exits 2 with exactly one `error:` line naming the thing to
fix, and no traceback (the helpers of `test_cli_errors` check all that).
These runs get as far as the data source and the abstract model, so they
take seconds each.
"""

import json
import os
import socket
import time

import jax
import numpy as np
from PIL import Image

from configs import synthetic
from pix2seq_d_jax import checkpointing, experiment
from tests.multiprocess_worker import NARROW_MODEL, narrow_model_flags
from tests.test_cli_errors import REPO, _check, _run


def _train_args(tmp_path, *extra):
  return [f"--workdir={tmp_path / 'w'}", "--config=configs/synthetic.py:tiny",
          f"--config.input.data_dir={tmp_path / 'data'}", "--mode=train",
          *narrow_model_flags(), *extra]


def test_locked_workdir_names_the_holder(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  # A live holder on this host: this test process.
  holder = dict(host=socket.gethostname(), pid=os.getpid(),
                start_time="2026-11-30T05:00:00", command="another run",
                token="t")
  (workdir / "lock").write_text(json.dumps(holder))
  t0 = time.time()
  line = _run(_train_args(tmp_path), REPO)
  _check(line, str(workdir), f"pid {os.getpid()}", socket.gethostname())
  assert time.time() - t0 < 120
  assert json.loads((workdir / "lock").read_text())["pid"] == os.getpid()


def test_model_init_file_that_is_no_export_says_why(tmp_path):
  weights = tmp_path / "r50.pth"
  weights.write_bytes(b"\x80\x04pickle")
  line = _run(_train_args(tmp_path, f"--config.model_init={weights}"), REPO)
  _check(line, str(weights), "unsupported format '.pth'",
         "safetensors.torch.save_file")


def test_checkpoint_of_another_model_config(tmp_path):
  # A checkpoint of the narrow model with twice the decoder width, in the
  # workdir the run resumes from and that predict reads.
  config = synthetic.get_config("tiny")
  config.model.update(NARROW_MODEL)
  config.model.dec_dim = 2 * NARROW_MODEL["dec_dim"]
  exp = experiment.create(config, total_steps=4)
  manager = checkpointing.make_manager(str(tmp_path / "w"), keep=1)
  checkpointing.save(manager, 1, exp.init_state(jax.random.key(0)),
                     force=True)
  manager.wait_until_finished()
  manager.close()
  line = _run(_train_args(tmp_path), REPO)
  _check(line, "in the checkpoint but", "config.json")
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "a.png")
  line = _run([
      "--config=configs/synthetic.py:tiny", *narrow_model_flags(),
      f"--config.input.data_dir={tmp_path / 'data'}",
      f"--checkpoint={tmp_path / 'w'}", f"--input={images}",
      f"--output={tmp_path / 'out'}"], REPO, module="pix2seq_d_jax.predict")
  _check(line, "in the checkpoint but", "config.json")
