"""Tests of the DAVIS palette PNG codec (formats.davis)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from pix2seq_d_jax.formats import davis as davis_format


def test_palette_is_pascal_voc_and_png_round_trips(tmp_path):
  palette = davis_format.davis_palette()
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  np.testing.assert_array_equal(
      palette[[0, 1, 2, 3, 4, 5, 255]],
      [
          [0, 0, 0],
          [128, 0, 0],
          [0, 128, 0],
          [128, 128, 0],
          [0, 0, 128],
          [128, 0, 128],
          [224, 224, 192],
      ],
  )
  ids = np.array([[0, 1, 2], [255, 7, 0]], np.uint8)
  path = tmp_path / 'sub' / '00000.png'
  davis_format.write_palette_png(path, ids)
  with Image.open(path) as im:
    assert im.mode == 'P'
    assert im.getpalette()[3:9] == [128, 0, 0, 0, 128, 0]
  np.testing.assert_array_equal(davis_format.read_palette_png(path), ids)
  assert os.listdir(tmp_path / 'sub') == ['00000.png']  # no temporary left


def test_reads_grayscale_and_file_objects_as_ids(tmp_path):
  ids = np.array([[0, 3], [255, 1]], np.uint8)
  gray = tmp_path / 'gray.png'
  Image.fromarray(ids, 'L').save(gray)
  np.testing.assert_array_equal(davis_format.read_palette_png(gray), ids)
  # TFDS records hold PNG bytes: the same decode from a file object.
  data = io.BytesIO(gray.read_bytes())
  np.testing.assert_array_equal(
      davis_format.read_palette_png(data, 'record 3'), ids
  )


def test_palette_png_errors_name_the_file(tmp_path):
  with pytest.raises(ValueError, match=r'\[0, 255\].*256'):
    davis_format.write_palette_png(tmp_path / 'a.png', np.array([[0, 256]]))
  with pytest.raises(FileNotFoundError, match='missing.png'):
    davis_format.read_palette_png(tmp_path / 'missing.png')
  rgb = tmp_path / 'rgb.png'
  Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(rgb)
  with pytest.raises(ValueError, match="rgb.png.*single-channel.*mode 'RGB'"):
    davis_format.read_palette_png(rgb)
  with pytest.raises(ValueError, match='record 7'):
    davis_format.read_palette_png(io.BytesIO(b'not a png'), 'record 7')
