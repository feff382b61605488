"""Procedural panoptic dataset written in the COCO 2017 panoptic layout.

Each scene is a partition of the image into STUFF regions (sky, grass, water,
wall: horizontal bands, vertical bands or a Voronoi partition; each class has
its own base colour and texture) with 1-6 THING instances drawn on top (circle,
square, triangle, ellipse: each class its own colour family with per-instance
variation; several of one class may appear, sizes vary, later shapes occlude
earlier ones). Class is recoverable from colour family and shape, so a tiny
model learns it in minutes on a CPU, yet the task keeps the real difficulties:
occlusion, small instances, several instances of a class. Images are lossless
PNGs; labels are COCO panoptic PNG + JSON, read back by `CocoPanopticSource`.
Images are square (`image_size=n`) or rectangular (`image_size=(h, w)`);
shape sizes follow the shorter side, band and Voronoi layouts the whole
frame, and a square size renders exactly what it always did.
`write_coco_layout` writes the same scenes cropped to COCO's image sizes,
as JPEGs, for the input benchmark.
Generation is deterministic per seed (each image has its own
`np.random.default_rng([seed, split, index])`), atomic (written into
`<root>.tmp-<pid>` and renamed), and `ensure_synthetic` caches datasets under a
hash of their parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from pix2seq_d_jax import config_lib
from pix2seq_d_jax.formats import coco_panoptic as coco_format
from pix2seq_d_jax.formats import paths

# Bump when the generator's output changes, so cached datasets are rebuilt.
GENERATOR_VERSION = 1

# (name, base RGB colour). Things get category ids 1.., stuff after them.
THING_CLASSES = (
    ('circle', (215, 40, 40)),  # red
    ('square', (235, 215, 45)),  # yellow
    ('triangle', (190, 60, 200)),  # magenta
    ('ellipse', (40, 225, 200)),  # cyan
)
STUFF_CLASSES = (
    ('sky', (125, 170, 235)),  # light blue, vertical gradient
    ('grass', (55, 140, 50)),  # green, grainy noise
    ('water', (25, 55, 125)),  # dark blue, horizontal ripples
    ('wall', (135, 115, 95)),  # brown-grey, brick grid
)
_SPLIT_INDEX = {'train': 0, 'val': 1}
# Image ids of the val split start here so ids are unique across splits.
_VAL_ID_OFFSET = 1_000_000
_MAX_THINGS = 6
_PARAM_DEFAULTS = {
    'num_train': 2000,
    'num_val': 100,
    'image_size': 64,
    'seed': 0,
}


def categories() -> list[dict[str, Any]]:
  """Returns the COCO-style category list (things first, ids from 1)."""
  cats = []
  for i, (name, color) in enumerate(THING_CLASSES + STUFF_CLASSES):
    is_thing = i < len(THING_CLASSES)
    cats.append(
        {
            'id': i + 1,
            'name': name,
            'supercategory': 'shape' if is_thing else 'background',
            'isthing': int(is_thing),
            'color': list(color),
        }
    )
  return cats


def image_hw(image_size: Any) -> tuple[int, int]:
  """A generator's `image_size` (an int or (h, w)) as (h, w), each >= 16.

  Raises:
    ValueError: a malformed size or a side below 16.
  """
  h, w = config_lib.size_hw(image_size, 'synthetic image_size')
  if min(h, w) < 16:
    raise ValueError(
        f'synthetic image_size={image_size!r}: expected sides >= 16.')
  return h, w


def size_param(image_size: Any) -> int | list[int]:
  """`image_size` as stored in `params.json` and the cache key.

  A square is its side (so existing caches keep their names whichever
  spelling asks for them), a rectangle the list [h, w].
  """
  h, w = image_hw(image_size)
  return h if h == w else [h, w]


def _stuff_layout(rng: np.random.Generator, hw: tuple[int, int]
                  ) -> np.ndarray:
  """Returns int [h, w] stuff class indices (into STUFF_CLASSES)."""
  height, width = hw
  num = int(rng.integers(2, 4))
  classes = rng.choice(len(STUFF_CLASSES), size=num, replace=False)
  yy, xx = np.mgrid[0:height, 0:width]
  kind = int(rng.integers(3))
  if kind < 2:  # horizontal or vertical bands
    coord = yy if kind == 0 else xx
    cuts = np.sort(rng.uniform(0.2, 0.8, size=num - 1)) * (
        height if kind == 0 else width)
    # A little waviness so band edges are not always straight lines.
    other = xx if kind == 0 else yy
    wave = rng.uniform(0, 2.5) * np.sin(
        other * rng.uniform(0.05, 0.25) + rng.uniform(0, 2 * np.pi)
    )
    band = np.searchsorted(cuts, coord + wave)
    return classes[band]
  # Voronoi partition with one or two seeds per class.
  seeds = rng.uniform(0, np.array(hw, np.float64),
                      size=(num + int(rng.integers(0, 2)), 2))
  owner = np.concatenate([np.arange(num), rng.integers(0, num, len(seeds))])
  d2 = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
  return classes[owner[np.argmin(d2, axis=-1)]]


def _stuff_texture(rng: np.random.Generator, cls: int,
                   hw: tuple[int, int]) -> np.ndarray:
  """Returns float [h, w, 3] colour of stuff class `cls` everywhere."""
  height, width = hw
  base = np.array(STUFF_CLASSES[cls][1], np.float32)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  yy, xx = yy / height, xx / width
  name = STUFF_CLASSES[cls][0]
  noise = rng.normal(0, 1, size=(height, width, 1)).astype(np.float32)
  if name == 'sky':
    tex = (0.5 - yy)[..., None] * 40 + noise * 3
  elif name == 'grass':
    tex = noise * 18
  elif name == 'water':
    phase = rng.uniform(0, 2 * np.pi)
    tex = np.sin(yy * height * 0.9 + phase)[..., None] * 14 + noise * 4
  else:  # wall: a brick grid of darker mortar lines
    brick = max(min(height, width) // 8, 3)
    row = (yy * height).astype(int) // brick
    shift = (row % 2) * (brick // 2)
    mortar = ((yy * height).astype(int) % brick == 0) | (
        ((xx * width).astype(int) + shift) % (2 * brick) == 0
    )
    tex = np.where(mortar, -45.0, 0.0)[..., None] + noise * 5
  jitter = rng.uniform(-12, 12, size=3).astype(np.float32)
  return base + jitter + tex


def _shape_mask(
    rng: np.random.Generator, cls: int, hw: tuple[int, int],
    min_extent: float
) -> np.ndarray:
  """Returns bool [h, w] for one random instance of thing `cls`.

  The shape's size follows the shorter side; its centre is anywhere in the
  frame that keeps most of it inside.
  """
  height, width = hw
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
  r = rng.uniform(min_extent, 0.26 * min(height, width))
  cy, cx = rng.uniform(r * 0.5, np.array(hw, np.float64) - r * 0.5, size=2)
  dy, dx = yy - cy, xx - cx
  name = THING_CLASSES[cls][0]
  if name == 'circle':
    return dy**2 + dx**2 <= r**2
  if name == 'square':
    return (np.abs(dy) <= r * 0.9) & (np.abs(dx) <= r * 0.9)
  if name == 'ellipse':
    theta = rng.uniform(0, np.pi)
    a, b = r * 1.15, r * rng.uniform(0.4, 0.6)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0
  # Triangle: intersection of three half-planes around the centre; a random
  # rotation keeps it from being confused with an axis-aligned shape.
  theta0 = rng.uniform(0, 2 * np.pi)
  angles = theta0 + np.array([0, 2, 4]) * np.pi / 3
  inside = np.ones(hw, np.bool_)
  for ang in angles:
    # Edge normals point outward; the inradius of a triangle with
    # circumradius 1.2 r is 0.6 r.
    inside &= dx * np.cos(ang) + dy * np.sin(ang) <= 0.6 * r * 1.2
  return inside


def _render_scene(
    rng: np.random.Generator, size: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
  """Draws one scene of `size` (an int for a square, or (h, w)).

  Returns:
    image uint8 [h, w, 3], ids int32 [h, w] (panoptic segment ids, no void)
    and segments_info (areas and boxes from the final map).
  """
  hw = image_hw(size)
  height, width = hw
  num_things = len(THING_CLASSES)
  scale = (height / 64.0) * (width / 64.0)
  # Visible area below this (after occlusion) is not allowed for any instance.
  min_visible = max(int(round(20 * scale)), 4)
  min_extent = max(2.8 * min(height, width) / 64.0, 2.0)

  stuff = _stuff_layout(rng, hw)
  image = np.zeros((height, width, 3), np.float32)
  for cls in np.unique(stuff):
    mask = stuff == cls
    image[mask] = _stuff_texture(rng, int(cls), hw)[mask]
  # Segment ids: stuff class c -> (num_things + c + 1) * 1000 (= category id
  # * 1000); thing instance k of category id c -> c * 1000 + k.
  ids = ((num_things + stuff + 1) * 1000).astype(np.int32)

  inst_map = np.zeros(hw, np.int32)  # 0 = no instance yet
  inst_class = []
  target = int(rng.integers(1, _MAX_THINGS + 1))
  for _ in range(target):
    cls = int(rng.integers(num_things))
    for _ in range(8):  # placement attempts
      mask = _shape_mask(rng, cls, hw, min_extent)
      if mask.sum() < min_visible:
        continue
      new_map = np.where(mask, len(inst_class) + 1, inst_map)
      areas = np.bincount(new_map.ravel(), minlength=len(inst_class) + 2)[
          1:
      ]
      # Occlusion may hide part of an earlier instance, never most of it.
      if (areas >= min_visible).all():
        inst_map = new_map
        inst_class.append(cls)
        base = np.array(THING_CLASSES[cls][1], np.float32)
        color = base + rng.uniform(-22, 22, size=3)
        shade = rng.normal(0, 4, size=(height, width, 1))
        image = np.where(mask[..., None], color + shade, image)
        break

  per_class_count = [0] * num_things
  for k, cls in enumerate(inst_class):
    per_class_count[cls] += 1
    ids[inst_map == k + 1] = (cls + 1) * 1000 + per_class_count[cls]

  segments = _segments_info(ids)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return image, ids, segments


def _segments_info(ids: np.ndarray) -> list[dict[str, Any]]:
  """COCO segments_info of int [h, w] ids (category = id // 1000)."""
  segments = []
  for seg_id in np.unique(ids):
    ys, xs = np.nonzero(ids == seg_id)
    x0, y0 = int(xs.min()), int(ys.min())
    segments.append(
        {
            'id': int(seg_id),
            'category_id': int(seg_id) // 1000,
            'area': int(len(ys)),
            'bbox': [
                x0,
                y0,
                int(xs.max()) - x0 + 1,
                int(ys.max()) - y0 + 1,
            ],
            'iscrowd': 0,
        }
    )
  return segments


def _write_split(root: str, split: str, num: int, size: tuple[int, int],
                 seed: int) -> None:
  images, annotations = [], []
  base_id = 0 if split == 'train' else _VAL_ID_OFFSET
  for i in range(num):
    rng = np.random.default_rng([seed, _SPLIT_INDEX[split], i])
    image, ids, segments = _render_scene(rng, size)
    image_id = base_id + i + 1
    name = f'{image_id:012d}.png'
    coco_format.write_rgb_image(
        os.path.join(root, f'{split}2017', name), image
    )
    coco_format.write_panoptic_png(
        os.path.join(root, 'annotations', f'panoptic_{split}2017', name),
        ids,
    )
    images.append(
        {'id': image_id, 'file_name': name, 'height': size[0],
         'width': size[1]}
    )
    annotations.append(
        {'image_id': image_id, 'file_name': name, 'segments_info': segments}
    )
  coco_format.write_panoptic_json(
      os.path.join(root, 'annotations', f'panoptic_{split}2017.json'),
      images,
      annotations,
      categories(),
  )


def full_params(defaults: dict[str, Any], params: dict[str, Any]
                ) -> dict[str, Any]:
  """`defaults` updated with `params`.

  Raises:
    TypeError: on a parameter name not in `defaults`.
  """
  unknown = sorted(set(params) - set(defaults))
  if unknown:
    raise TypeError(
        f'Unknown synthetic dataset parameter(s) {unknown}; valid: '
        f'{sorted(defaults)}.'
    )
  return {**defaults, **params}


def is_complete(root: str) -> bool:
  """Whether a finished synthetic dataset is at `root` (local or a URL).

  A bucket has no folder rename: there `params.json`, uploaded last, marks
  a complete dataset.
  """
  if paths.is_url(root):
    return (epath.Path(root) / 'params.json').exists()
  return os.path.isdir(root)


def _upload(local: str, root: str) -> None:
  """Copies the folder `local` to the URL `root`, `params.json` last."""
  dest = epath.Path(root)
  files = sorted(
      os.path.relpath(os.path.join(d, f), local)
      for d, _, names in os.walk(local) for f in names
  )
  files.sort(key=lambda rel: rel == 'params.json')  # Stable: marker last.
  for rel in files:
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(os.path.join(local, rel), 'rb') as f:
      target.write_bytes(f.read())


def write_atomically(root: str, write: Any, params: dict[str, Any]) -> None:
  """Runs `write(tmp)` into `<root>.tmp-<pid>`, then renames it to `root`.

  `params` is saved as `params.json`. An interrupted run never leaves a
  partial dataset at `root`. A URL `root` (`gs://...`) is written into a
  local temporary folder and uploaded with `params.json` last, the marker
  `is_complete` looks for: an interrupted upload leaves no marker.

  Raises:
    FileExistsError: if `root` already exists.
  """
  if paths.is_url(root):
    if is_complete(root):
      raise FileExistsError(
          f'Synthetic dataset folder already exists: {root}')
    with tempfile.TemporaryDirectory() as local:
      write_atomically(os.path.join(local, 'dataset'), write, params)
      _upload(os.path.join(local, 'dataset'), root)
    return
  root = os.path.abspath(root)
  if os.path.exists(root):
    raise FileExistsError(
        f'Synthetic dataset folder already exists: {root}'
    )
  tmp = f'{root}.tmp-{os.getpid()}'
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  try:
    write(tmp)
    with open(os.path.join(tmp, 'params.json'), 'w') as f:
      json.dump(params, f, sort_keys=True)
    os.replace(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def cache_dir(data_dir: str, prefix: str, defaults: dict[str, Any],
              version: int, params: dict[str, Any]) -> str:
  """`<data_dir>/<prefix>-<hash of the full parameters and version>`.

  `image_size` enters as `size_param` gives it: 64, (64, 64) and [64, 64]
  name one dataset, as they render the same images.
  """
  full = {**full_params(defaults, params), 'version': version}
  if 'image_size' in full:
    full['image_size'] = size_param(full['image_size'])
  key = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()
  return os.path.join(data_dir, f'{prefix}-{key[:12]}')


def ensure_cached(data_dir: str, prefix: str, defaults: dict[str, Any],
                  version: int, generate_fn: Any,
                  params: dict[str, Any]) -> str:
  """Returns the cached dataset folder, running `generate_fn` on first use.

  The folder name is a hash of the parameters (and the generator version),
  so different parameters never share a folder. Safe when several processes
  call it at once: each generates into its own temporary folder and the first
  rename wins; the others discard their copy.
  """
  root = cache_dir(data_dir, prefix, defaults, version, params)
  if is_complete(root):
    return root
  paths.to_epath(data_dir).mkdir(parents=True, exist_ok=True)
  logging.info('Generating synthetic dataset %s in %s', params, root)
  try:
    generate_fn(root, **params)
  except (FileExistsError, OSError):
    # Another process finished first (os.replace onto a non-empty folder fails
    # with OSError); its dataset is identical, so use it.
    if not is_complete(root):
      raise
  return root


def generate(
    root: str,
    *,
    num_train: int = _PARAM_DEFAULTS['num_train'],
    num_val: int = _PARAM_DEFAULTS['num_val'],
    image_size: int | tuple[int, int] = _PARAM_DEFAULTS['image_size'],
    seed: int = _PARAM_DEFAULTS['seed'],
) -> None:
  """Writes a synthetic panoptic dataset (train and val) in the COCO layout.

  The dataset is built in `<root>.tmp-<pid>` and renamed to `root` at the
  end, so an interrupted run never leaves a partial dataset at `root`.

  Args:
    root: destination folder; must not exist yet.
    num_train: number of train images (>= 1).
    num_val: number of val images (>= 1).
    image_size: side of square images, or (height, width); sides >= 16.
    seed: base seed; equal arguments give byte-identical files.

  Raises:
    ValueError: on invalid sizes or counts.
    FileExistsError: if `root` already exists.
  """
  if num_train < 1 or num_val < 1:
    raise ValueError(
        f'num_train and num_val must be >= 1, got {num_train}, {num_val}.'
    )
  hw = image_hw(image_size)

  def write(tmp):
    for split, num in (('train', num_train), ('val', num_val)):
      _write_split(tmp, split, num, hw, seed)

  params = {
      'num_train': num_train,
      'num_val': num_val,
      'image_size': size_param(hw),
      'seed': seed,
      'version': GENERATOR_VERSION,
  }
  write_atomically(root, write, params)


def write_coco_layout(
    root: str, *, num_images: int, height: int, width: int, seed: int
) -> None:
  """Writes synthetic scenes as a COCO-sized train split in COCO's layout.

  For benchmarks that need COCO's file formats and image sizes: each scene
  is rendered as in `generate` (the train scene of the same index and seed at
  `image_size=max(height, width)`) and cropped to its top-left height x
  width. Images are JPEGs (`train2017/<id>.jpg`, as COCO ships them) and
  labels panoptic PNGs plus `annotations/panoptic_train2017.json`, whose
  areas and boxes are those of the cropped maps. Built in `<root>.tmp-<pid>`
  and renamed, with `params.json`.

  Args:
    root: destination folder; must not exist yet.
    num_images: number of images (>= 1); image ids are 1..num_images.
    height: image height (>= 16).
    width: image width (>= 16).
    seed: base seed; equal arguments give identical files.

  Raises:
    ValueError: on invalid sizes or counts.
    FileExistsError: if `root` already exists.
  """
  if num_images < 1:
    raise ValueError(f'num_images must be >= 1, got {num_images}.')
  if min(height, width) < 16:
    raise ValueError(
        f'height and width must be >= 16, got {height}, {width}.'
    )

  def write(tmp):
    images, annotations = [], []
    for i in range(num_images):
      rng = np.random.default_rng([seed, _SPLIT_INDEX['train'], i])
      image, ids, _ = _render_scene(rng, max(height, width))
      image, ids = image[:height, :width], ids[:height, :width]
      stem = f'{i + 1:012d}'
      coco_format.write_rgb_image(
          os.path.join(tmp, 'train2017', f'{stem}.jpg'), image
      )
      coco_format.write_panoptic_png(
          os.path.join(tmp, 'annotations', 'panoptic_train2017',
                       f'{stem}.png'),
          ids,
      )
      images.append({'id': i + 1, 'file_name': f'{stem}.jpg',
                     'height': height, 'width': width})
      annotations.append({'image_id': i + 1, 'file_name': f'{stem}.png',
                          'segments_info': _segments_info(ids)})
    coco_format.write_panoptic_json(
        os.path.join(tmp, 'annotations', 'panoptic_train2017.json'),
        images, annotations, categories(),
    )

  params = {
      'num_images': num_images,
      'height': height,
      'width': width,
      'seed': seed,
      'version': GENERATOR_VERSION,
  }
  write_atomically(root, write, params)


def dataset_dir(data_dir: str, **params: Any) -> str:
  """Returns the cache folder of a synthetic dataset with these parameters.

  Args:
    data_dir: cache root.
    **params: any of num_train, num_val, image_size, seed (others rejected).

  Raises:
    TypeError: on an unknown parameter name.
  """
  return cache_dir(data_dir, 'synthetic', _PARAM_DEFAULTS, GENERATOR_VERSION,
                   params)


def ensure_synthetic(data_dir: str, **params: Any) -> str:
  """Returns a synthetic dataset folder, generating it on first use.

  Args:
    data_dir: cache root (created if missing).
    **params: any of num_train, num_val, image_size, seed.

  Returns:
    The dataset root, ready for `CocoPanopticSource(root, split)`.
  """
  return ensure_cached(data_dir, 'synthetic', _PARAM_DEFAULTS,
                       GENERATOR_VERSION, generate, params)
