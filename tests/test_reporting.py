"""Tests of the periodic-action cadence and the JSON-lines metrics log."""

import json

import numpy as np

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
