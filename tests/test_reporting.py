"""Tests of the periodic-action cadence and the JSON-lines metrics log."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

from pix2seq_d_jax import reporting


def test_itstime_every_first_last():
  fired = [s for s in range(1, 11) if reporting.itstime(s, 4, 10)]
  assert fired == [4, 8, 10]
  fired = [s for s in range(1, 11)
           if reporting.itstime(s, 4, 10, first=True)]
  assert fired == [1, 4, 8, 10]
  assert [s for s in range(1, 6) if reporting.itstime(s, None, 5)] == [5]
  assert not any(reporting.itstime(s, 0, 5, last=False) for s in range(1, 6))


def test_reporter_writes_one_json_object_per_call(tmp_path):
  rep = reporting.Reporter(str(tmp_path), total_steps=3)
  rep.write_scalars(1, {"train/loss": np.float32(2.5), "x": np.int64(3)})
  rep.write_scalars(2, {"train/loss": float("nan")})
  rep.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[0] == {"step": 1, "train/loss": 2.5, "x": 3}
  assert rows[1] == {"step": 2, "train/loss": "nan"}


_WRITE_WITHOUT_TF = r"""
import json, sys
import jax.numpy as jnp
import numpy as np
from pix2seq_d_jax import reporting
rep = reporting.Reporter(sys.argv[1], total_steps=10, start_step=0)
rep.write_config({"seed": 3, "model": {"name": "tiny", "width": 0.5}})
rep.write_scalars(1, {"train/loss": np.float32(2.5)})
rep.write_scalars(2, {"train/loss": jnp.float32(1.25), "eval/a/pq": 0.5})
rep.close()
print(json.dumps(sorted(m for m in sys.modules
                        if m.split(".")[0] in ("tensorflow", "clu"))))
"""


def _scalars(workdir, tag):
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(workdir))
  acc.Reload()
  return acc, [(e.step, e.value) for e in acc.Scalars(tag)]


def test_reporter_imports_no_tensorflow_and_writes_tensorboard(tmp_path):
  out = subprocess.run(
      [sys.executable, "-c", _WRITE_WITHOUT_TF, str(tmp_path)],
      capture_output=True, text=True, check=True,
  )
  assert json.loads(out.stdout.splitlines()[-1]) == []
  acc, loss = _scalars(tmp_path, "train/loss")
  assert loss == [(1, 2.5), (2, 1.25)]
  assert [(e.step, e.value) for e in acc.Scalars("eval/a/pq")] == [(2, 0.5)]
  from tensorboard.plugins.hparams import plugin_data_pb2

  content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  hparams = plugin_data_pb2.HParamsPluginData.FromString(
      content).session_start_info.hparams
  assert hparams["seed"].number_value == 3
  assert hparams["model.name"].string_value == "tiny"
  assert hparams["model.width"].number_value == 0.5


def test_resume_truncates_jsonl_and_purges_events(tmp_path):
  rep = reporting.Reporter(str(tmp_path), total_steps=6, start_step=0)
  for step in range(1, 6):
    rep.write_scalars(step, {"train/loss": float(step)})
  rep.write_scalars(4, {"eval/a/pq": 0.25})
  rep.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "train/lo')  # A write cut by a kill.
  # Resumed from the checkpoint of step 4: steps 5 and 6 are redone.
  rep = reporting.Reporter(str(tmp_path), total_steps=6, start_step=4)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows == [{"step": s, "train/loss": float(s)} for s in range(1, 5)] + [
      {"step": 4, "eval/a/pq": 0.25}]
  rep.write_scalars(5, {"train/loss": 50.0})
  rep.write_scalars(6, {"train/loss": 60.0})
  rep.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 4, 5, 6]
  assert [r.get("train/loss") for r in rows][-2:] == [50.0, 60.0]
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
  _, loss = _scalars(tmp_path, "train/loss")
  assert loss == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0),
                  (6, 60.0)]


def test_truncate_jsonl_keeps_file_when_nothing_to_drop(tmp_path):
  path = tmp_path / "metrics.jsonl"
  assert reporting.truncate_jsonl(str(path), 3) == 0
  path.write_text('{"step": 1}\n{"step": 3}\n')
  mtime = path.stat().st_mtime_ns
  assert reporting.truncate_jsonl(str(path), 3) == 0
  assert path.stat().st_mtime_ns == mtime
  assert reporting.truncate_jsonl(str(path), 2) == 1
  assert path.read_text() == '{"step": 1}\n'


def test_progress_line_once_per_interval(tmp_path, monkeypatch, caplog):
  clock = iter([100.0, 101.0, 110.0, 130.0, 131.0])
  monkeypatch.setattr(reporting.time, "monotonic", lambda: next(clock))
  rep = reporting.Reporter(str(tmp_path), total_steps=500, start_step=None,
                           every_secs=30.0)
  caplog.set_level(logging.INFO)
  rep.write_scalars(1, {"train/loss": 5.54517})
  rep.step_done(1)      # t=100: the first line.
  rep.step_done(2)      # t=101: not due.
  rep.step_done(10)     # t=110: not due.
  rep.write_scalars(300, {"train/loss": np.float32(0.123456)})
  rep.step_done(300)    # t=130: due, 299 steps in 30 s.
  rep.step_done(500)    # t=131: the last step.
  rep.close()
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("step ")]
  assert lines == [
      "step 1/500  loss 5.545",
      "step 300/500  9.97 steps/s  loss 0.1235  ETA 00:00:20",
      "step 500/500  200 steps/s  loss 0.1235  ETA 00:00:00",
  ]


def test_eval_scalars_get_one_line_and_hparams_none(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  rep = reporting.Reporter(str(tmp_path), total_steps=5)
  rep.write_config({"a": "x" * 3000})
  rep.write_scalars(5, {"eval/coco/pq": 0.51234, "eval/coco/num_images": 8,
                        "time/eval_coco_secs": 12.5, "train/loss": 1.0})
  rep.close()
  info = [r.getMessage() for r in caplog.records
          if r.levelno >= logging.INFO]
  assert info == ["step 5  eval coco: pq 0.512  num_images 8"]


def test_format_metrics_table():
  table = reporting.format_metrics_table(
      {"panoptic": {"pq": 0.523456, "sq": 0.81, "num_images": 8,
                    "skipped": ["a.png"]},
       "val2": {"pq": 1234.5678, "rq": float("nan")}},
      {"predictions": "/w/predictions/panoptic_step4", "overlays": "/w/ov"},
  )
  assert table == (
      "metric      panoptic  val2\n"
      "pq          0.523     1230\n"
      "sq          0.81      -\n"
      "num_images  8         -\n"
      "rq          -         nan\n"
      "predictions  /w/predictions/panoptic_step4\n"
      "overlays     /w/ov"
  )


def test_log_parameters_writes_table_and_totals(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  params = {"params": {
      "encoder": {"w": jax.ShapeDtypeStruct((300, 4000), jnp.float32)},
      "head": {"b": np.zeros(5, np.float32),
               "k": jax.ShapeDtypeStruct((2, 2, 2), jnp.float32)},
  }}
  assert reporting.log_parameters(params, str(tmp_path / "w")) == 1_200_013
  table = (tmp_path / "w" / "parameters.txt").read_text()
  assert "params/encoder/w | (300, 4000)" in table
  assert "Total: 1,200,013" in table
  info = [r.getMessage() for r in caplog.records
          if r.levelno == logging.INFO]
  assert info == [
      "Parameters: 1,200,013 total (1.2M): encoder 1.2M, head 13; table in "
      f"{tmp_path}/w/parameters.txt"
  ]


def test_configure_terminal_filters_library_info(monkeypatch):
  monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
  handler = absl_logging.get_absl_handler()
  jax_logger = logging.getLogger("jax")
  monkeypatch.setattr(jax_logger, "level", jax_logger.level)

  def record(path, level=logging.INFO):
    return logging.LogRecord("absl", level, path, 1, "m", None, None)

  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  ours = "/work/pix2seq_d_jax/train.py"
  try:
    reporting.configure_terminal(0)
    reporting.configure_terminal(0)  # Twice adds one filter.
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    assert jax_logger.level == logging.WARNING
    assert sum(isinstance(f, reporting._LibraryInfoFilter)
               for f in handler.filters) == 1
    assert not handler.filter(record(orbax))
    assert handler.filter(record(orbax, logging.WARNING))
    assert handler.filter(record(ours))
    reporting.configure_terminal(1)
    assert handler.filter(record(orbax))
    assert jax_logger.level == logging.NOTSET
  finally:
    reporting.configure_terminal(1)


_NOISY_START = r"""
from absl import flags, logging
flags.FLAGS.mark_as_parsed()
logging.use_absl_handler()
logging.set_verbosity(logging.INFO)
from pix2seq_d_jax import reporting
import sys
reporting.configure_terminal(int(sys.argv[1]))
import jax
jax.devices()
logging.info("ours")
"""


def test_default_verbosity_hides_startup_notices():
  # The TF oneDNN notice ignores TF_CPP_MIN_LOG_LEVEL (TF 2.21 logs it with
  # absl's C++ LOG); it goes away because no TF is imported any more.
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env["JAX_PLATFORMS"] = ""

  def stderr(verbosity):
    return subprocess.run(
        [sys.executable, "-c", _NOISY_START, str(verbosity)],
        capture_output=True, text=True, check=True, env=env,
    ).stderr

  quiet = stderr(0).strip().splitlines()
  assert len(quiet) == 1 and quiet[0].endswith("] ours"), quiet
  assert "Unable to initialize backend" in stderr(1)
