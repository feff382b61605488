"""Colour overlays of panoptic segmentations for eyeballing predictions.

Colours are deterministic so that the same image rendered at two checkpoints
can be compared side by side: a stuff segment is coloured by its class (the
same class looks the same everywhere), each thing segment gets its own colour
drawn from a seeded generator and kept away from the colours already used, and
void is black. `overlay_strip` puts the image, the image blended with the
ground truth and the image blended with the prediction in one row, with an
optional title bar drawn by PIL's default font. numpy and PIL only.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pix2seq_d_jax.formats import atomic
from pix2seq_d_jax.formats import coco_panoptic as coco_format

_GOLDEN = 0.6180339887498949
# Smallest max-channel difference between two thing colours (or a thing and a
# stuff colour) before a redraw; 255 / 6 keeps them apart by eye.
_MIN_DISTANCE = 42
_MAX_TRIES = 64
# Prediction overlays and denoising-trajectory GIFs.
_MIN_GIF_SIDE = 128
_GIF_FRAME_MS = 250
_GIF_LAST_FRAME_MS = 1000
_OVERLAY_ALPHA = 0.5
_OVERLAY_GAP = 4


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
  r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
  return (round(255 * r), round(255 * g), round(255 * b))


def _class_color(category_id: int, seed: int) -> tuple[int, int, int]:
  # Golden-ratio hue steps keep nearby class ids far apart on the hue circle.
  hue = (category_id + 1) * _GOLDEN + seed * 0.1234
  saturation = 0.35 + 0.2 * (category_id % 3)
  value = 0.65 + 0.15 * (category_id // 3 % 3)
  return _hsv_to_rgb(hue, saturation, value)


def segment_colors(
  segment_ids: np.ndarray,
  segments_info: Sequence[Mapping[str, Any]],
  seed: int = 0,
) -> dict[int, tuple[int, int, int]]:
  """Assigns a colour to every segment of a panoptic map.

  Args:
    segment_ids: int [h, w] segment ids, 0 = void.
    segments_info: dicts with `id`, `category_id` and `isthing` (missing
      `isthing` counts as a thing). Ids present in the map but not listed are
      coloured like things.
    seed: changes the colours; the same inputs and seed give the same colours.

  Returns:
    segment id -> (r, g, b) for every id in the map or in segments_info,
    except void (0), which is black. No segment is black.
  """
  ids_in_map = np.unique(np.asarray(segment_ids)).tolist()
  info_by_id = {int(s["id"]): s for s in segments_info}
  colors: dict[int, tuple[int, int, int]] = {}
  things = []
  for segment_id in sorted(set(ids_in_map) | set(info_by_id)):
    if segment_id == 0:
      continue
    info = info_by_id.get(segment_id)
    if info is not None and not info.get("isthing", True):
      colors[segment_id] = _class_color(int(info["category_id"]), seed)
    else:
      things.append(segment_id)

  used = np.array(list(colors.values()), np.int64).reshape(-1, 3)
  rng = np.random.default_rng([seed, 0x5EED])
  for segment_id in things:
    # Redraw until far enough from every colour in use; crowded images keep
    # the farthest candidate.
    best, best_distance = None, -1
    for _ in range(_MAX_TRIES):
      h, s, v = rng.uniform((0.0, 0.55, 0.6), (1.0, 1.0, 1.0))
      color = _hsv_to_rgb(h, s, v)
      distance = np.abs(used - color).max(axis=1).min() if used.size else 255
      if distance > best_distance:
        best, best_distance = color, distance
      if distance >= _MIN_DISTANCE:
        break
    colors[segment_id] = best
    used = np.concatenate([used, [best]])
  return colors


def colorize(
  segment_ids: np.ndarray,
  segments_info: Sequence[Mapping[str, Any]],
  seed: int = 0,
) -> np.ndarray:
  """Paints a panoptic map with `segment_colors`.

  Args:
    segment_ids: int [h, w] segment ids, 0 = void.
    segments_info: as for `segment_colors`.
    seed: colour seed.

  Returns:
    uint8 [h, w, 3]; void pixels are black.
  """
  segment_ids = np.asarray(segment_ids)
  if segment_ids.ndim != 2:
    raise ValueError(
      f"segment_ids: expected [h, w], got shape {segment_ids.shape}"
    )
  colors = segment_colors(segment_ids, segments_info, seed)
  colors[0] = (0, 0, 0)
  ids, inverse = np.unique(segment_ids, return_inverse=True)
  palette = np.array([colors[int(i)] for i in ids], np.uint8).reshape(-1, 3)
  return palette[inverse.reshape(segment_ids.shape)]


def _check_rgb(array: np.ndarray, name: str, shape=None) -> np.ndarray:
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(
      f"{name}: expected uint8 [h, w, 3], got {array.dtype} {array.shape}"
    )
  if shape is not None and array.shape != shape:
    raise ValueError(f"{name}: shape {array.shape} differs from image {shape}")
  return array


def blend(image: np.ndarray, rgb: np.ndarray, alpha: float) -> np.ndarray:
  """Mixes colours into an image where they are not void.

  Args:
    image: uint8 [h, w, 3].
    rgb: uint8 [h, w, 3] segment colours; black (void) leaves the image as is.
    alpha: weight of the colours.

  Returns:
    uint8 [h, w, 3], round((1 - alpha) * image + alpha * rgb) on labelled
    pixels.
  """
  out = image.copy()
  labelled = rgb.any(axis=-1)
  mixed = (1.0 - alpha) * image[labelled] + alpha * rgb[labelled].astype(float)
  out[labelled] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
  return out


def overlay_strip(
  image: np.ndarray,
  gt_rgb: np.ndarray,
  pred_rgb: np.ndarray,
  *,
  alpha: float = 0.5,
  titles: Sequence[str] | None = ("image", "ground truth", "prediction"),
  gap: int = 4,
) -> np.ndarray:
  """Lays out image | image + ground truth | image + prediction in one row.

  Args:
    image: uint8 [h, w, 3].
    gt_rgb: uint8 [h, w, 3] colorized ground truth (black = void).
    pred_rgb: uint8 [h, w, 3] colorized prediction.
    alpha: weight of the segment colours in the blend, in [0, 1].
    titles: three panel titles drawn in a white bar above the panels, or
      None for no bar.
    gap: white pixels between panels.

  Returns:
    uint8 [bar + h, 3 * w + 2 * gap, 3]; bar is 0 without titles, else the
    default font's line height plus 4.

  Raises:
    ValueError: on shape/dtype mismatches, alpha outside [0, 1], a negative
      gap or not exactly three titles.
  """
  image = _check_rgb(image, "image")
  gt_rgb = _check_rgb(gt_rgb, "gt_rgb", image.shape)
  pred_rgb = _check_rgb(pred_rgb, "pred_rgb", image.shape)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
  if gap < 0:
    raise ValueError(f"gap: expected >= 0, got {gap}")
  if titles is not None and len(titles) != 3:
    raise ValueError(f"titles: expected 3 strings or None, got {titles!r}")

  h, w, _ = image.shape
  font = ImageFont.load_default()
  bar = 0
  if titles is not None:
    # Measured on a fixed string so the bar height does not depend on titles.
    top, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
      (0, 0), "Ag", font=font
    )[1::2]
    bar = bottom - top + 4
  canvas = np.full((bar + h, 3 * w + 2 * gap, 3), 255, np.uint8)
  panels = (image, blend(image, gt_rgb, alpha), blend(image, pred_rgb, alpha))
  for k, panel in enumerate(panels):
    canvas[bar:, k * (w + gap) : k * (w + gap) + w] = panel
  if titles is not None:
    header = Image.fromarray(canvas[:bar])
    draw = ImageDraw.Draw(header)
    for k, title in enumerate(titles):
      draw.text((k * (w + gap) + 2, 2 - top), title, fill=(0, 0, 0), font=font)
    canvas[:bar] = np.asarray(header)
  return canvas


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes uint8 [h, w], [h, w, 3] or [h, w, 4] pixels as a PNG, atomically.

  Parent folders are created.

  Raises:
    ValueError: if array is not uint8 of one of those shapes.
  """
  array = np.asarray(array)
  if array.dtype != np.uint8 or not (
    array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
  ):
    raise ValueError(
      f"array: expected uint8 [h, w], [h, w, 3] or [h, w, 4] for {path}, got "
      f"{array.dtype} {array.shape}"
    )
  atomic.write_bytes(path, coco_format.encode_image(array))



def colorize_pairs(
    semantic: np.ndarray, instance: np.ndarray, is_thing: np.ndarray
) -> np.ndarray:
  """Colours raw (semantic, instance) masks, one colour per segment.

  Unlike `visualize.colorize`, the colour is a fixed function of the
  (class, instance id) pair, so a segment keeps its colour across sampling
  steps. Void (class 0) is black; stuff pixels take their class's colour
  whatever their instance id.

  Args:
    semantic: int [..., h, w] classes, in [0, len(is_thing)).
    instance: int [..., h, w] instance ids in [0, 2**16).
    is_thing: bool [num_classes].

  Returns:
    uint8 [..., h, w, 3].
  """
  semantic = np.asarray(semantic, np.int64)
  instance = np.asarray(instance, np.int64)
  is_thing = np.asarray(is_thing, bool)
  key = semantic * (1 << 16) + np.where(is_thing[semantic], instance, 0)
  uniq, inverse = np.unique(key, return_inverse=True)
  palette = np.array([_pair_color(int(k)) for k in uniq], np.uint8)
  palette[uniq < (1 << 16)] = 0  # Class 0: void.
  return palette.reshape(-1, 3)[inverse.reshape(key.shape)]


@functools.cache
def _pair_color(key: int) -> tuple[int, int, int]:
  # A generator seeded by the pair: stable across steps, images and runs.
  hsv = np.random.default_rng([key, 0xC0102]).uniform(
      (0.0, 0.5, 0.6), (1.0, 1.0, 1.0)
  )
  r, g, b = colorsys.hsv_to_rgb(*hsv)
  return round(255 * r), round(255 * g), round(255 * b)


def label_font_size(height: int, width: int) -> int:
  """Label text height in pixels for an image: 1/30 of its shorter side."""
  return max(8, round(min(height, width) / 30))


def overlay(
    image: np.ndarray,
    segment_ids: np.ndarray,
    segments_info: Sequence[dict[str, Any]],
    names: dict[int, str],
) -> np.ndarray:
  """Lays out image | image blended with segments, and names the classes.

  Text scales with the image (`label_font_size`). A segment's class name is
  drawn on it, centred on its centroid and kept inside its bounding box,
  only when the label fits in that box; the names of smaller segments go to
  a legend strip below (a swatch of the segment's colour and the name), so
  a label never hides a small object.

  Args:
    image: uint8 [H, W, 3].
    segment_ids: int [H, W] panoptic ids, 0 = void.
    segments_info: segments `{id, category_id, isthing}`.
    names: category id -> class name.

  Returns:
    uint8 [H + legend, 2 * W + 4, 3]; the legend strip is absent (0 rows)
    when every label fits on its segment.
  """
  h, w, _ = image.shape
  colors = segment_colors(segment_ids, segments_info)
  rgb = colorize(segment_ids, segments_info)
  panel = Image.fromarray(blend(image, rgb, _OVERLAY_ALPHA))
  draw = ImageDraw.Draw(panel)
  font = ImageFont.load_default(size=label_font_size(h, w))
  ys, xs = np.nonzero(segment_ids)
  ids = segment_ids[ys, xs]
  n = int(segment_ids.max(initial=0)) + 1
  count = np.bincount(ids, minlength=n)
  cy = np.bincount(ids, ys, minlength=n) / np.maximum(count, 1)
  cx = np.bincount(ids, xs, minlength=n) / np.maximum(count, 1)
  y0 = np.full(n, h)
  x0 = np.full(n, w)
  y1 = np.full(n, -1)
  x1 = np.full(n, -1)
  np.minimum.at(y0, ids, ys)
  np.minimum.at(x0, ids, xs)
  np.maximum.at(y1, ids, ys)
  np.maximum.at(x1, ids, xs)
  legend = []
  for seg in segments_info:
    i = int(seg["id"])
    if i >= n or count[i] == 0:
      continue
    text = names.get(int(seg["category_id"]), str(seg["category_id"]))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 2, bottom - top + 2
    if tw > x1[i] - x0[i] + 1 or th > y1[i] - y0[i] + 1:
      legend.append((colors.get(i, (0, 0, 0)), text))
      continue
    x = int(min(max(cx[i] - tw / 2, x0[i]), x1[i] + 1 - tw))
    y = int(min(max(cy[i] - th / 2, y0[i]), y1[i] + 1 - th))
    draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=(0, 0, 0))
    draw.text((x + 1 - left, y + 1 - top), text, fill=(255, 255, 255),
              font=font)
  canvas = np.full((h, 2 * w + _OVERLAY_GAP, 3), 255, np.uint8)
  canvas[:, :w] = image
  canvas[:, w + _OVERLAY_GAP:] = np.asarray(panel)
  if not legend:
    return canvas
  return np.concatenate([canvas, _legend(legend, canvas.shape[1], font)])


def _legend(entries: Sequence[tuple[tuple[int, int, int], str]], width: int,
            font: Any) -> np.ndarray:
  """Rows of `[swatch] name` entries, wrapped to `width`; uint8 RGB."""
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  _, top, _, bottom = measure.textbbox((0, 0), "Ag", font=font)
  line = bottom - top + 4
  pad = max(2, line // 4)
  layout, x, row = [], pad, 0
  for color, text in entries:
    left, _, right, _ = measure.textbbox((0, 0), text, font=font)
    item = line + pad + (right - left) + 2 * pad
    if x + item > width and x > pad:
      x, row = pad, row + 1
    layout.append((x, row, color, text, left))
    x += item
  strip = Image.new("RGB", (width, (row + 1) * line + pad), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for x, r, color, text, left in layout:
    y = pad + r * line
    draw.rectangle((x, y, x + line - 3, y + line - 3), fill=color,
                   outline=(0, 0, 0))
    draw.text((x + line + pad - left, y - top + 1), text, fill=(0, 0, 0),
              font=font)
  return np.asarray(strip)


def save_trajectory(frames: np.ndarray, png_path: str, gif_path: str) -> None:
  """Writes the frames as one horizontal strip and as an animated GIF.

  The strip is [h, steps * w] at mask resolution. GIF frames are enlarged
  by an integer factor and carry a progress bar at the bottom; the bar also
  keeps consecutive frames distinct, which PIL would otherwise merge.

  Args:
    frames: uint8 [steps, h, w, 3].
    png_path: destination of the strip.
    gif_path: destination of the animation.
  """
  steps, h, w, _ = frames.shape
  save_png(png_path, np.concatenate(list(frames), axis=1))
  k = max(1, math.ceil(_MIN_GIF_SIDE / max(h, w)), math.ceil(steps / w))
  big = frames.repeat(k, axis=1).repeat(k, axis=2)
  bar = max(3, k * h // 20)
  images = []
  for s in range(steps):
    frame = np.full((k * h + bar, k * w, 3), 64, np.uint8)
    frame[: k * h] = big[s]
    frame[k * h :, : round((s + 1) * k * w / steps)] = 255
    images.append(Image.fromarray(frame))
  durations = [_GIF_FRAME_MS] * (steps - 1) + [_GIF_LAST_FRAME_MS]
  buffer = io.BytesIO()
  images[0].save(buffer, format="GIF", save_all=True,
                 append_images=images[1:], duration=durations, loop=0)
  atomic.write_bytes(gif_path, buffer.getvalue())
