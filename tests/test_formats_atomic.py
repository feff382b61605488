"""Tests of the atomic file writer (formats.atomic)."""

import json
import os

import pytest

from pix2seq_d_jax.formats import atomic


def test_writes_bytes_text_and_json_leaving_no_temporary(tmp_path):
  folder = tmp_path / 'new' / 'sub'
  atomic.write_bytes(folder / 'a.bin', b'\x00\x01')
  atomic.write_text(str(folder / 'b.txt'), 'héllo')
  atomic.write_json(folder / 'c.json', {'pq': 0.5, 'n': [1, 2]}, indent=2)
  assert (folder / 'a.bin').read_bytes() == b'\x00\x01'
  assert (folder / 'b.txt').read_text(encoding='utf-8') == 'héllo'
  assert json.loads((folder / 'c.json').read_text()) == {
      'pq': 0.5, 'n': [1, 2]
  }
  assert (folder / 'c.json').read_text().startswith('{\n  "pq"')
  assert sorted(os.listdir(folder)) == ['a.bin', 'b.txt', 'c.json']


def test_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / 'metrics.json'
  atomic.write_json(path, {'step': 1})
  atomic.write_json(path, {'step': 2})
  assert json.loads(path.read_text()) == {'step': 2}
  # Not serialisable: nothing is written, the previous content stays whole.
  with pytest.raises(TypeError):
    atomic.write_json(path, {'step': object()})
  assert json.loads(path.read_text()) == {'step': 2}
  assert os.listdir(tmp_path) == ['metrics.json']


def test_a_failed_rename_removes_the_temporary(tmp_path):
  # A non-empty folder at the destination makes the rename fail after the
  # temporary is complete: the error surfaces and no temporary is left.
  (tmp_path / 'out' / 'x').mkdir(parents=True)
  with pytest.raises(OSError):
    atomic.write_bytes(tmp_path / 'out', b'data')
  assert os.listdir(tmp_path) == ['out']
