"""Procedural video clips written in the DAVIS 2017 layout.

Each sequence is a static textured background (the stuff layouts and
textures of `synthetic`) with 1-3 objects (the thing shapes of `synthetic`)
that move in straight lines at constant speed and bounce off the borders.
Objects have a fixed depth order, so they occlude each other when they
cross; every object is fully inside the first frame, which matters because
the DAVIS scorer takes the object count from the first annotation. Frames
are JPEGs, annotations palette PNGs whose value is the object id (1..n, 0
background) in both `Annotations/` and `Annotations_unsupervised/`, and
`ImageSets/2017/{train,val}.txt` list the sequences, so `DavisSource` and
the DAVIS J&F scorer read it like the real dataset. Frames are square
(`image_size=n`) or rectangular (`image_size=(h, w)`). Generation is
deterministic per seed, atomic and cached by a hash of the parameters
(`synthetic.ensure_cached`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from pix2seq_d_jax.data import register_source, synthetic
from pix2seq_d_jax.data.davis import DavisSource
from pix2seq_d_jax.formats import davis as davis_format

GENERATOR_VERSION = 1
RESOLUTION = '480p'
PARAM_DEFAULTS = {
    'num_train': 64,
    'num_val': 8,
    'num_frames': 8,
    'image_size': 64,
    'seed': 0,
}
_SPLIT_INDEX = {'train': 0, 'val': 1}
_MAX_OBJECTS = 3


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """Moves a bool mask by (dy, dx) pixels; what leaves the frame is lost."""
  out = np.zeros_like(mask)
  h, w = mask.shape
  ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (
      slice(-dy, h), slice(0, h + dy))
  xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (
      slice(-dx, w), slice(0, w + dx))
  out[yd, xd] = mask[ys, xs]
  return out


def _bounce(pos: float, vel: float, lo: float, hi: float) -> tuple:
  """One step of a position reflected at [lo, hi]."""
  pos += vel
  if pos < lo:
    pos, vel = 2 * lo - pos, -vel
  elif pos > hi:
    pos, vel = 2 * hi - pos, -vel
  return pos, vel


def render_sequence(rng: np.random.Generator, size: int | tuple[int, int],
                    num_frames: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws one sequence of frames of `size` (an int or (h, w)).

  Returns:
    frames uint8 [T, h, w, 3] and object ids uint8 [T, h, w] (0 background,
    k = the k-th object from the back).
  """
  hw = synthetic.image_hw(size)
  stuff = synthetic._stuff_layout(rng, hw)
  background = np.zeros(hw + (3,), np.float32)
  for cls in np.unique(stuff):
    region = stuff == cls
    background[region] = synthetic._stuff_texture(rng, int(cls), hw)[region]
  min_extent = max(3.5 * min(hw) / 64.0, 2.0)
  objects = []
  for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
    cls = int(rng.integers(len(synthetic.THING_CLASSES)))
    mask = synthetic._shape_mask(rng, cls, hw, min_extent)
    ys, xs = np.nonzero(mask)
    if len(ys) < 8:
      continue
    # Box of the shape; positions are offsets of the box's top-left corner.
    y0, x0 = ys.min(), xs.min()
    h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
    base = np.array(synthetic.THING_CLASSES[cls][1], np.float32)
    objects.append({
        'mask': _shift(mask, -int(y0), -int(x0)),
        'size': (int(h), int(w)),
        'pos': [float(y0), float(x0)],
        'vel': list(rng.uniform(-0.06, 0.06, size=2) * np.array(hw)),
        'color': base + rng.uniform(-22, 22, size=3),
    })
  frames = np.zeros((num_frames, *hw, 3), np.uint8)
  ids = np.zeros((num_frames, *hw), np.uint8)
  for t in range(num_frames):
    image = background.copy()
    for k, obj in enumerate(objects):
      mask = _shift(obj['mask'], int(round(obj['pos'][0])),
                    int(round(obj['pos'][1])))
      shade = rng.normal(0, 4, size=hw + (1,))
      image = np.where(mask[..., None], obj['color'] + shade, image)
      ids[t][mask] = k + 1
      for axis in (0, 1):
        obj['pos'][axis], obj['vel'][axis] = _bounce(
            obj['pos'][axis], obj['vel'][axis], 0.0,
            float(hw[axis] - obj['size'][axis]))
    frames[t] = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return frames, ids


def _write_split(root: str, split: str, num: int, num_frames: int,
                 size: tuple[int, int], seed: int) -> None:
  names = []
  for i in range(num):
    rng = np.random.default_rng([seed, _SPLIT_INDEX[split], i, 7])
    frames, ids = render_sequence(rng, size, num_frames)
    name = f'{split}-{i:04d}'
    names.append(name)
    image_dir = os.path.join(root, 'JPEGImages', RESOLUTION, name)
    os.makedirs(image_dir, exist_ok=True)
    for t in range(num_frames):
      Image.fromarray(frames[t]).save(
          os.path.join(image_dir, f'{t:05d}.jpg'), quality=95)
      for folder in ('Annotations', 'Annotations_unsupervised'):
        davis_format.write_palette_png(
            os.path.join(root, folder, RESOLUTION, name, f'{t:05d}.png'),
            ids[t])
  sets = os.path.join(root, 'ImageSets', '2017')
  os.makedirs(sets, exist_ok=True)
  with open(os.path.join(sets, f'{split}.txt'), 'w') as f:
    f.write(''.join(n + '\n' for n in names))


def generate(root: str, **params: Any) -> None:
  """Writes train and val sequences in the DAVIS 2017 layout under `root`.

  Args:
    root: destination; must not exist (built in a temporary folder and
      renamed, so an interrupted run leaves nothing at `root`).
    **params: num_train, num_val (sequences, >= 1), num_frames (>= 2),
      image_size (an int or (height, width), sides >= 16), seed.

  Raises:
    ValueError: on invalid counts or sizes; TypeError on unknown names.
  """
  p = synthetic.full_params(PARAM_DEFAULTS, params)
  if p['num_train'] < 1 or p['num_val'] < 1 or p['num_frames'] < 2:
    raise ValueError(
        f'synthetic video: need num_train, num_val >= 1 and num_frames >= 2, '
        f'got {p}.')
  hw = synthetic.image_hw(p['image_size'])
  p['image_size'] = synthetic.size_param(hw)

  def write(tmp):
    for split in ('train', 'val'):
      _write_split(tmp, split, p[f'num_{split}'], p['num_frames'], hw,
                   p['seed'])

  synthetic.write_atomically(root, write, {**p, 'version': GENERATOR_VERSION})


def ensure_synthetic_video(data_dir: str, **params: Any) -> str:
  """Returns the cached dataset folder for `params`, generating it once."""
  return synthetic.ensure_cached(
      data_dir, 'synthetic-video', PARAM_DEFAULTS, GENERATOR_VERSION,
      generate, params)


@register_source('synthetic_video')
def _synthetic_video(
    *,
    data_dir: str,
    split: str,
    clip_length: int = 1,
    max_examples: int | None = None,
    skip_bad_examples: bool = False,
    **generator_params: Any,
) -> DavisSource:
  """Synthetic clips cached under `data_dir`, read as DAVIS (unsupervised).

  `generator_params` are those of `generate` (num_train, num_val,
  num_frames, image_size, seed); the dataset is generated on first use.
  """
  root = ensure_synthetic_video(data_dir, **generator_params)
  return DavisSource(root, split, task='unsupervised',
                     resolution=RESOLUTION, clip_length=clip_length,
                     max_examples=max_examples,
                     skip_bad_examples=skip_bad_examples)
