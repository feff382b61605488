"""Tests of panoptic colouring, overlay strips and PNG writing."""

import numpy as np
from PIL import Image

from pix2seq_d_jax.evaluators import visualize

IDS = np.array([[0, 1, 1, 2], [3, 3, 4, 4], [5, 0, 6, 6]])
INFO = [
  {"id": 1, "category_id": 7, "isthing": False},
  {"id": 2, "category_id": 7, "isthing": False},
  {"id": 3, "category_id": 9, "isthing": False},
  {"id": 4, "category_id": 1, "isthing": True},
  {"id": 5, "category_id": 1, "isthing": True},
  {"id": 6, "category_id": 2, "isthing": True},
]


def test_colorize_void_black_deterministic_and_by_class():
  rgb = visualize.colorize(IDS, INFO)
  assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[IDS == 0], 0)
  assert (rgb[IDS != 0].max(axis=-1) > 0).all()
  np.testing.assert_array_equal(visualize.colorize(IDS, INFO), rgb)
  assert not np.array_equal(visualize.colorize(IDS, INFO, seed=1), rgb)
  colors = visualize.segment_colors(IDS, INFO)
  # Stuff segments of one class share a colour, whatever else is present.
  assert colors[1] == colors[2] != colors[3]
  alone = visualize.segment_colors(np.array([[2]]), INFO[1:2])
  assert alone[2] == colors[2]
  # Things get distinct colours (also distinct from stuff).
  assert len({colors[i] for i in (3, 4, 5, 6)}) == 4
  assert colors[4] != colors[1]


def test_many_thing_colours_are_distinct():
  ids = np.arange(1, 31).reshape(5, 6)
  info = [{"id": i, "category_id": 1, "isthing": True} for i in range(1, 31)]
  colors = visualize.segment_colors(ids, info, seed=3)
  assert len(set(colors.values())) == 30
  assert (0, 0, 0) not in colors.values()


def test_overlay_strip_layout_and_blend():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
  gt_rgb = visualize.colorize(IDS, INFO)
  pred_rgb = np.zeros_like(gt_rgb)
  strip = visualize.overlay_strip(image, gt_rgb, pred_rgb, titles=None, gap=2)
  assert strip.shape == (3, 3 * 4 + 2 * 2, 3)
  np.testing.assert_array_equal(strip[:, :4], image)
  np.testing.assert_array_equal(strip[:, 4:6], 255)
  expected = np.where(
    (IDS != 0)[..., None],
    np.rint(0.5 * image + 0.5 * gt_rgb.astype(float)),
    image,
  )
  np.testing.assert_array_equal(strip[:, 6:10], expected)
  # An all-void prediction leaves the image untouched.
  np.testing.assert_array_equal(strip[:, 12:16], image)

  titled = visualize.overlay_strip(image, gt_rgb, pred_rgb, gap=2, alpha=0.5)
  bar = titled.shape[0] - 3
  assert bar > 0 and titled.shape[1:] == strip.shape[1:]
  np.testing.assert_array_equal(titled[bar:], strip)
  assert (titled[:bar] < 128).any()  # the titles were drawn


def test_save_png_round_trip(tmp_path):
  rgb = visualize.colorize(IDS, INFO)
  path = tmp_path / "sub" / "x.png"
  visualize.save_png(path, rgb)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)


def test_overlay_labels_big_segments_and_lists_small_ones_in_a_legend():
  # A 120x160 image: a large stuff segment, a 40x60 thing, and a 3x3 thing
  # far smaller than any label.
  h, w = 120, 160
  image = np.full((h, w, 3), 128, np.uint8)
  ids = np.ones((h, w), np.int32)
  ids[10:50, 20:80] = 2
  ids[100:103, 140:143] = 3
  info = [{"id": 1, "category_id": 1, "isthing": False},
          {"id": 2, "category_id": 2, "isthing": True},
          {"id": 3, "category_id": 3, "isthing": True}]
  names = {1: "sky", 2: "car", 3: "bird"}
  out = visualize.overlay(image, ids, info, names)
  assert out.shape[1:] == (2 * w + 4, 3) and out.shape[0] > h
  panel = out[:h, w + 4:]
  blended = visualize.blend(image, visualize.colorize(ids, info), 0.5)
  changed = np.any(panel != blended, axis=-1)
  # The small segment is untouched on the panel: its name is in the legend.
  assert not changed[100:103, 140:143].any()
  # The car's label is drawn on the car.
  assert changed[10:50, 20:80].any()
  # The legend shows the bird's colour swatch.
  bird = visualize.segment_colors(ids, info)[3]
  legend = out[h:]
  assert np.all(legend == bird, axis=-1).any()
  # Text scales with the image.
  assert visualize.label_font_size(480, 640) > visualize.label_font_size(
      120, 160) >= 8
  # When every label fits on its segment there is no legend strip.
  big = visualize.overlay(image, ids, info[:2], names)
  assert big.shape == (h, 2 * w + 4, 3)
