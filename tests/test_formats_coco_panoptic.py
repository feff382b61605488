"""Tests of the COCO panoptic RGB<->id encoding and file helpers."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pix2seq_d_jax.formats import coco_panoptic as pf


def test_rgb_to_id_hand_computed():
  rgb = np.array([[[1, 2, 3], [0, 0, 0]], [[255, 255, 255], [0, 1, 0]]])
  np.testing.assert_array_equal(
      pf.rgb_to_id(rgb.astype(np.uint8)),
      [[1 + 2 * 256 + 3 * 65536, 0], [256**3 - 1, 256]],
  )


def _panopticapi_rgb2id(color):
  # panopticapi/utils.py rgb2id, verbatim but for the name.
  if isinstance(color, np.ndarray) and len(color.shape) == 3:
    if color.dtype == np.uint8:
      color = color.astype(np.int32)
    return color[:, :, 0] + 256 * color[:, :, 1] + 256 * 256 * color[:, :, 2]
  return int(color[0] + 256 * color[1] + 256 * 256 * color[2])


def test_rgb_to_id_equals_panopticapi(tmp_path):
  rng = np.random.default_rng(1)
  rgba = rng.integers(0, 256, size=(5, 6, 4)).astype(np.uint8)
  rgba[0, 0] = [255, 255, 255, 0]
  # uint8 (panopticapi's rgb2id on decoded pixels), uint32 (its pq_compute
  # reads np.array(Image.open(png), dtype=np.uint32)); alpha is ignored.
  for pixels in (rgba[..., :3], rgba[..., :3].astype(np.uint32), rgba):
    ids = pf.rgb_to_id(pixels)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, _panopticapi_rgb2id(pixels))
  # The file reader decodes like pq_compute, for RGB and RGBA PNGs alike.
  for mode, pixels in (('RGB', rgba[..., :3]), ('RGBA', rgba)):
    path = tmp_path / f'{mode}.png'
    Image.fromarray(pixels, mode).save(path)
    expected = _panopticapi_rgb2id(
        np.array(Image.open(path), dtype=np.uint32)
    )
    np.testing.assert_array_equal(pf.read_panoptic_png(str(path)), expected)
    data = io.BytesIO(path.read_bytes())
    np.testing.assert_array_equal(pf.read_panoptic_png(data), expected)


def test_non_rgb_panoptic_pngs_are_rejected(tmp_path):
  # A palette or grayscale PNG is not in the id encoding; converting it to
  # RGB would invent ids that panopticapi never computes.
  for mode in ('P', 'L'):
    path = tmp_path / f'{mode}.png'
    Image.fromarray(np.ones((2, 2), np.uint8), mode).save(path)
    with pytest.raises(ValueError, match=f'{mode}.png.*rgb_to_id'):
      pf.read_panoptic_png(str(path))
  with pytest.raises(ValueError, match=r'\[h, w, 3\]'):
    pf.rgb_to_id(np.zeros((2, 2), np.uint8))


def test_id_rgb_round_trip_including_large_ids():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 256**3, size=(7, 9)).astype(np.int32)
  ids[0, :4] = [0, 255, 65536, 256**3 - 1]
  rgb = pf.id_to_rgb(ids)
  assert rgb.dtype == np.uint8 and rgb.shape == (7, 9, 3)
  np.testing.assert_array_equal(pf.rgb_to_id(rgb), ids)


def test_id_to_rgb_rejects_out_of_range():
  with pytest.raises(ValueError, match='16777215'):
    pf.id_to_rgb(np.array([[256**3]]))
  with pytest.raises(ValueError, match=r'\[0, '):
    pf.id_to_rgb(np.array([[-1]]))


def test_png_round_trip(tmp_path):
  ids = np.array([[0, 1, 70000], [256**3 - 1, 513, 5]], np.int32)
  path = str(tmp_path / 'sub' / 'a.png')
  pf.write_panoptic_png(path, ids)
  np.testing.assert_array_equal(pf.read_panoptic_png(path), ids)
  assert os.listdir(tmp_path / 'sub') == ['a.png']  # no temporary left


def test_png_errors_name_the_file(tmp_path):
  missing = str(tmp_path / 'missing.png')
  with pytest.raises(FileNotFoundError, match='missing.png'):
    pf.read_panoptic_png(missing)
  bad = tmp_path / 'bad.png'
  bad.write_bytes(b'\x89PNG not really a png')
  with pytest.raises(ValueError, match='bad.png'):
    pf.read_panoptic_png(str(bad))


def test_json_round_trip_and_errors(tmp_path):
  path = str(tmp_path / 'p.json')
  images = [{'id': 3, 'file_name': 'a.jpg', 'height': 2, 'width': 3}]
  anns = [
      {
          'image_id': 3,
          'file_name': 'a.png',
          'segments_info': [{'id': 7, 'category_id': 1}],
      }
  ]
  cats = [{'id': 1, 'name': 'x', 'isthing': 1}]
  pf.write_panoptic_json(path, images, anns, cats)
  content = pf.load_panoptic_json(path)
  assert content == {
      'images': images,
      'annotations': anns,
      'categories': cats,
  }

  with pytest.raises(FileNotFoundError, match='nope.json'):
    pf.load_panoptic_json(str(tmp_path / 'nope.json'))
  bad = tmp_path / 'bad.json'
  bad.write_text('{"images": [')
  with pytest.raises(ValueError, match='bad.json.*not valid JSON'):
    pf.load_panoptic_json(str(bad))
  nokey = tmp_path / 'nokey.json'
  nokey.write_text(json.dumps({'images': [], 'annotations': []}))
  with pytest.raises(ValueError, match="nokey.json.*'categories'"):
    pf.load_panoptic_json(str(nokey))
  noseg = tmp_path / 'noseg.json'
  anns_bad = [{'image_id': 3, 'file_name': 'a.png', 'segments_info': [{}]}]
  noseg.write_text(
      json.dumps(
          {'images': images, 'annotations': anns_bad, 'categories': []}
      )
  )
  with pytest.raises(ValueError, match=r'noseg.json.*segments_info\[0\]'):
    pf.load_panoptic_json(str(noseg))
