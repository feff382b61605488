r"""Throughput of the training input pipeline on COCO-sized data.

  python -m pix2seq_d_jax.data.throughput [--data_dir DIR] [--num_images 64] \
      [--num_workers 0,1,2] [--batch_size 8] [--batches 10] \
      [--image_size 1024] [--mask_size 256] [--scale_range 0.1,2.0] \
      [--output throughput.json]

Answers "does the input pipeline limit training?": the examples/s that the
real train loader (`pipeline.make_train_loader` over `CocoPanopticSource`
with `preprocess.preprocess_train`, built with the same arguments as
`train.py`) delivers on this machine, for each number of grain worker
processes, and the cost of each preprocessing op on one example.

Data. A COCO-panoptic-layout fixture is written once into `--data_dir`
(default: a temporary folder removed at exit; a given folder is reused when
the parameters match, keyed by their hash): COCO-sized JPEGs (640x480 and
480x640 alternating) with textured segments and noise so that JPEG decoding
costs what it does on photos, panoptic PNGs with about 10-20 segments (3-6
stuff, 7-13 things and one crowd drawn, a few hidden by occlusion; void on
segment boundaries) under random 24-bit segment ids as in COCO, and a JSON
with COCO's 133 categories (80 things, 53 stuff, non-contiguous ids).

Method. Each worker count gets a fresh loader; the first batch (process
start-up included) is reported separately, then warm-up batches are drawn
and discarded: by default 1 + workers * (worker_buffer_size + 1), so the
batches the workers buffered while the first one was awaited are used up
and every timed batch is produced inside the timed window. Then `--batches`
batches are timed back to back: examples/s is their example count over
their total time (the loop does no other work, so this is the rate the
pipeline can feed a train step that takes no time). The per-op table runs
the same chain as `preprocess_train`, op by op with the same random draws,
on `--op_examples` examples `--op_repeats` times (new random draws each
time, so the jitter scale varies as in training), and reports mean and
median wall milliseconds (the mean is what throughput depends on) and the
mean CPU time of the thread, which stays meaningful when other processes
share the cores.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageDraw

from pix2seq_d_jax import data as data_lib
from pix2seq_d_jax.data import (
    coco_panoptic,
    panoptic_format,
    pipeline,
    preprocess,
)

# Bump when the fixture writer's output changes, so cached fixtures rebuild.
FIXTURE_VERSION = 1
# COCO's thing category ids are 1..90 without these ten; stuff ids follow.
_COCO_UNUSED_THING_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
NUM_THINGS = 80
NUM_STUFF = 53
# COCO's photos are high-quality JPEGs; this gives their file size here.
JPEG_QUALITY = 95
# Defaults of pipeline.make_train_loader, which train.py does not override.
_WORKER_BUFFER_SIZE = 2

# The per-op breakdown, in the order preprocess_train runs them.
OPS = (
    'decode_jpeg',
    'decode_png',
    'panoptic_ids',
    'flip',
    'lsj',
    'color_jitter',
    'mask_resize',
    'instance_ids',
    'loss_weights',
    'output_casts',
)
_OP_HELP = {
    'decode_jpeg': 'JPEG file -> uint8 RGB',
    'decode_png': 'panoptic PNG file -> uint8 RGB',
    'panoptic_ids': 'RGB -> segment ids -> semantic/instance/crowd',
    'flip': 'random left-right flip',
    'lsj': 'large-scale jitter: resize, crop, pad',
    'color_jitter': 'to float [0, 1] + colour jitter',
    'mask_resize': 'label maps to mask size (nearest)',
    'instance_ids': 'random instance ids',
    'loss_weights': 'small-instance loss weights',
    'output_casts': 'final dtype casts (copies)',
}


# --------------------------------------------------------------- fixture


def coco_like_categories() -> list[dict[str, Any]]:
  """Returns 133 categories laid out like COCO panoptic's.

  80 things with COCO's ids (1..90 minus the ten unused ones), then 53 stuff
  categories with ids 92, 94, ..., so ids are non-contiguous as in COCO and
  the reader's id -> class mapping is exercised.
  """
  thing_ids = [i for i in range(1, 91) if i not in _COCO_UNUSED_THING_IDS]
  stuff_ids = [92 + 2 * i for i in range(NUM_STUFF)]
  cats = []
  groups = ((thing_ids, 1, 'thing'), (stuff_ids, 0, 'stuff'))
  for ids, isthing, prefix in groups:
    for k, cid in enumerate(ids):
      cats.append(
          {
              'id': cid,
              'name': f'{prefix}_{k:02d}',
              'supercategory': prefix,
              'isthing': isthing,
              'color': [(37 * cid) % 256, (91 * cid) % 256, (53 * cid) % 256],
          }
      )
  return cats


def _draw_shape(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int,
    fill: int, scale: float,
) -> None:
  """Draws one random ellipse, rectangle or polygon of extent ~ scale."""
  cy, cx = rng.uniform(0, h), rng.uniform(0, w)
  ry, rx = scale * rng.uniform(0.5, 1.5, size=2)
  kind = int(rng.integers(3))
  if kind == 0:
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
  elif kind == 1:
    draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
  else:
    n = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.4, 1.0, n)
    pts = [
        (float(cx + rx * r * np.cos(a)), float(cy + ry * r * np.sin(a)))
        for a, r in zip(angles, radius, strict=True)
    ]
    draw.polygon(pts, fill=fill)


def render_example(
    rng: np.random.Generator,
    height: int,
    width: int,
    categories: Sequence[dict[str, Any]],
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
  """Draws one COCO-like scene.

  Stuff is a Voronoi partition among 3-6 stuff categories; 7-13 things
  (ellipses, rectangles, irregular polygons, log-uniform sizes so many are
  small) and one crowd segment are painted over it, later ones occluding
  earlier ones; pixels on segment boundaries are void (id 0), as in COCO.
  Each segment has its own colour, shading and low-frequency texture, and
  the whole image gets pixel noise, so the JPEG carries photo-like detail.

  Args:
    rng: randomness source.
    height: image height.
    width: image width.
    categories: COCO-style categories (`id`, `isthing`).

  Returns:
    image uint8 [height, width, 3], ids int32 [height, width] (segment ids,
    0 = void) and segments_info (only segments with visible pixels).
  """
  things = [c['id'] for c in categories if c['isthing']]
  stuff = [c['id'] for c in categories if not c['isthing']]
  n_stuff = int(rng.integers(3, 7))
  n_things = int(rng.integers(7, 14))
  seg_cats = list(rng.choice(stuff, n_stuff, replace=False))
  seg_crowd = [0] * n_stuff
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  seeds = rng.uniform((0, 0), (height, width), size=(n_stuff, 2))
  d2 = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
  label = Image.fromarray(np.argmin(d2, axis=-1).astype(np.int32), 'I')
  draw = ImageDraw.Draw(label)
  short = min(height, width)
  # The crowd segment is painted last, so no thing hides it completely.
  for k in range(n_things + 1):
    crowd = k == n_things
    seg_cats.append(int(rng.choice(things)))
    seg_crowd.append(int(crowd))
    scale = short * (0.25 if crowd else np.exp(rng.uniform(np.log(0.02),
                                                           np.log(0.3))))
    _draw_shape(draw, rng, height, width, len(seg_cats) - 1, scale)
  label = np.asarray(label, np.int32)
  n_seg = len(seg_cats)

  # Void on boundaries: the lower/right pixel of every label change.
  boundary = np.zeros((height, width), np.bool_)
  boundary[1:] |= label[1:] != label[:-1]
  boundary[:, 1:] |= label[:, 1:] != label[:, :-1]
  # Random distinct 24-bit ids, as COCO's colour-derived ids are.
  seg_ids = rng.choice(panoptic_format.MAX_SEGMENT_ID, n_seg, replace=False)
  seg_ids = (seg_ids + 1).astype(np.int32)
  ids = np.where(boundary, 0, seg_ids[label]).astype(np.int32)

  base = rng.uniform(20, 235, size=(n_seg, 3)).astype(np.float32)
  grad = rng.uniform(-60, 60, size=(n_seg, 2)).astype(np.float32)
  image = base[label]
  image += (grad[label, 0] * yy / height + grad[label, 1] * xx / width)[
      ..., None
  ]
  # Low-frequency texture: coarse noise upsampled bilinearly.
  coarse = rng.normal(0, 1, size=(max(height // 12, 2), max(width // 12, 2)))
  texture = np.asarray(
      Image.fromarray(coarse.astype(np.float32), 'F').resize(
          (width, height), Image.Resampling.BILINEAR
      )
  )
  amp = rng.uniform(5, 30, size=n_seg).astype(np.float32)
  image += (amp[label] * texture)[..., None]
  image += rng.normal(0, 7, size=image.shape).astype(np.float32)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)

  segments = []
  visible = ids != 0
  for s in range(n_seg):
    mask = (label == s) & visible
    if not mask.any():
      continue  # fully occluded: absent from the PNG, so not listed
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    segments.append(
        {
            'id': int(seg_ids[s]),
            'category_id': int(seg_cats[s]),
            'area': int(mask.sum()),
            'bbox': [
                int(cols[0]),
                int(rows[0]),
                int(cols[-1] - cols[0] + 1),
                int(rows[-1] - rows[0] + 1),
            ],
            'iscrowd': seg_crowd[s],
        }
    )
  return image, ids, segments


def write_fixture(
    root: str, *, num_images: int, long_side: int, short_side: int, seed: int
) -> None:
  """Writes a COCO-panoptic-layout train split of COCO-like images.

  Layout: `root/train2017/<id>.jpg`, `root/annotations/panoptic_train2017/
  <id>.png`, `root/annotations/panoptic_train2017.json` and
  `root/params.json`. Even examples are landscape (short x long), odd ones
  portrait. Built in `<root>.tmp-<pid>` and renamed, so an interrupted run
  leaves no partial fixture.

  Args:
    root: destination folder; must not exist yet.
    num_images: number of images (>= 1).
    long_side: longer image side (COCO: 640).
    short_side: shorter image side (COCO: 480), 8 <= short <= long.
    seed: equal arguments give identical files.

  Raises:
    ValueError: on invalid sizes or counts.
    FileExistsError: if `root` exists.
  """
  if num_images < 1:
    raise ValueError(f'--num_images must be >= 1, got {num_images}.')
  if not 8 <= short_side <= long_side:
    raise ValueError(
        f'--fixture_size: need 8 <= short <= long side, got long={long_side}, '
        f'short={short_side}.'
    )
  root = os.path.abspath(root)
  if os.path.exists(root):
    raise FileExistsError(f'Fixture folder already exists: {root}')
  tmp = f'{root}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  cats = coco_like_categories()
  images, annotations = [], []
  try:
    for i in range(num_images):
      h, w = (short_side, long_side) if i % 2 == 0 else (long_side, short_side)
      image, ids, segments = render_example(
          np.random.default_rng([seed, i]), h, w, cats
      )
      image_id = i + 1
      stem = f'{image_id:012d}'
      os.makedirs(os.path.join(tmp, 'train2017'), exist_ok=True)
      # Not panoptic_format.write_rgb_image: it saves at PIL's default
      # quality 75, a third of the bytes of COCO's JPEGs (~160 kB for
      # 640x480), and decode time grows with the bytes. The whole fixture
      # is renamed into place at the end, so this write needs no atomicity.
      Image.fromarray(image, 'RGB').save(
          os.path.join(tmp, 'train2017', f'{stem}.jpg'), format='JPEG',
          quality=JPEG_QUALITY,
      )
      panoptic_format.write_panoptic_png(
          os.path.join(tmp, 'annotations', 'panoptic_train2017', f'{stem}.png'),
          ids,
      )
      images.append(
          {'id': image_id, 'file_name': f'{stem}.jpg', 'height': h, 'width': w}
      )
      annotations.append(
          {
              'image_id': image_id,
              'file_name': f'{stem}.png',
              'segments_info': segments,
          }
      )
    panoptic_format.write_panoptic_json(
        os.path.join(tmp, 'annotations', 'panoptic_train2017.json'),
        images,
        annotations,
        cats,
    )
    with open(os.path.join(tmp, 'params.json'), 'w') as f:
      json.dump(
          _fixture_params(num_images, long_side, short_side, seed), f,
          sort_keys=True,
      )
    os.replace(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _fixture_params(
    num_images: int, long_side: int, short_side: int, seed: int
) -> dict[str, int]:
  return {
      'num_images': num_images,
      'long_side': long_side,
      'short_side': short_side,
      'seed': seed,
      'version': FIXTURE_VERSION,
  }


def ensure_fixture(
    data_dir: str, *, num_images: int, long_side: int, short_side: int,
    seed: int = 0,
) -> str:
  """Returns the fixture folder under `data_dir`, writing it on first use.

  The folder name is a hash of the parameters, so a fixture is reused only
  when it was written with the same ones.

  Args:
    data_dir: parent folder (created if missing).
    num_images: see `write_fixture`.
    long_side: see `write_fixture`.
    short_side: see `write_fixture`.
    seed: see `write_fixture`.

  Returns:
    The dataset root, ready for `CocoPanopticSource(root, 'train')`.
  """
  params = _fixture_params(num_images, long_side, short_side, seed)
  key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
  root = os.path.join(os.path.abspath(data_dir), f'coco_like-{key[:12]}')
  if os.path.isdir(root):
    return root
  os.makedirs(data_dir, exist_ok=True)
  logging.info('Writing the COCO-like fixture %s into %s', params, root)
  write_fixture(
      root, num_images=num_images, long_side=long_side, short_side=short_side,
      seed=seed,
  )
  return root


def fixture_stats(root: str) -> dict[str, float]:
  """Mean file sizes and the segment counts of a fixture (for the report)."""
  content = panoptic_format.load_panoptic_json(
      os.path.join(root, 'annotations', 'panoptic_train2017.json')
  )
  jpeg = [
      os.path.getsize(os.path.join(root, 'train2017', im['file_name']))
      for im in content['images']
  ]
  png = [
      os.path.getsize(
          os.path.join(root, 'annotations', 'panoptic_train2017',
                       a['file_name'])
      )
      for a in content['annotations']
  ]
  segs = [len(a['segments_info']) for a in content['annotations']]
  return {
      'num_images': len(content['images']),
      'num_categories': len(content['categories']),
      'jpeg_mean_kb': float(np.mean(jpeg)) / 1e3,
      'png_mean_kb': float(np.mean(png)) / 1e3,
      'segments_mean': float(np.mean(segs)),
      'segments_min': int(min(segs)),
      'segments_max': int(max(segs)),
  }


# ------------------------------------------------------------- loader rate


def train_preprocess_fn(
    *,
    image_size: int,
    mask_size: int,
    max_instances: int,
    scale_range: tuple[float, float],
    flip: bool,
    color_jitter: float,
    loss_weight_power: float,
) -> Callable[..., dict[str, np.ndarray]]:
  """The train preprocess function, built with train.py's arguments.

  Mirrors `train.train_preprocess_fn` (config.input fields and
  config.diffusion.loss_weight_power) without needing a config or importing
  the training module.
  """
  return functools.partial(
      preprocess.preprocess_train,
      image_size=image_size,
      mask_size=mask_size,
      max_instances=max_instances,
      scale_range=tuple(scale_range),
      flip=flip,
      color_jitter_strength=color_jitter,
      loss_weight_power=loss_weight_power,
  )


def _close(iterator: Any) -> None:
  """Stops a grain iterator's worker processes and threads now.

  `DataLoaderIterator` has no public close; its inner dataset iterator does.
  Without this the previous measurement's workers could still be running
  (filling their buffers) while the next one is timed.
  """
  close = getattr(getattr(iterator, '_iterator', None), 'close', None)
  if close is not None:
    close()


def time_loader(
    source: pipeline.RandomAccessSource,
    preprocess_fn: Callable[..., dict[str, np.ndarray]],
    *,
    batch_size: int,
    num_workers: int,
    batches: int,
    warmup_batches: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
  """Times the train loader with `num_workers` worker processes.

  Args:
    source: random-access source of raw examples.
    preprocess_fn: the train preprocess function.
    batch_size: examples per batch.
    num_workers: grain worker processes (0 = in this process).
    batches: timed batches (>= 1).
    warmup_batches: untimed batches after the first one; None = 1 +
      num_workers * (worker_buffer_size + 1) (see the module docstring).
    seed: loader seed.

  Returns:
    num_workers, first_batch_s (loader creation to first batch), warmup
    batches, examples, total_s, examples_per_s (= examples / total_s),
    ms_per_batch (= 1000 total_s / batches), median_ms_per_batch,
    mb_per_batch (10^6 bytes) and batch_times_s.

  Raises:
    ValueError: on a bad count (names the flag).
  """
  if batches < 1:
    raise ValueError(f'--batches must be >= 1, got {batches}.')
  if num_workers < 0:
    raise ValueError(f'--num_workers must be >= 0, got {num_workers}.')
  if warmup_batches is None:
    warmup_batches = 1 + num_workers * (_WORKER_BUFFER_SIZE + 1)
  if warmup_batches < 0:
    raise ValueError(f'--warmup_batches must be >= 0, got {warmup_batches}.')
  t0 = time.perf_counter()
  it = pipeline.make_train_loader(
      source,
      batch_size=batch_size,
      seed=seed,
      preprocess_fn=preprocess_fn,
      shard_index=0,
      shard_count=1,
      num_workers=num_workers,
      worker_buffer_size=_WORKER_BUFFER_SIZE,
  )
  try:
    first = next(it)
    first_batch_s = time.perf_counter() - t0
    nbytes = sum(np.asarray(v).nbytes for v in first.values())
    del first
    for _ in range(warmup_batches):
      next(it)
    times = []
    start = prev = time.perf_counter()
    for _ in range(batches):
      next(it)
      now = time.perf_counter()
      times.append(now - prev)
      prev = now
    total = prev - start
  finally:
    _close(it)
    del it  # releases the shared memory of the last worker batches
    gc.collect()
  examples = batches * batch_size
  return {
      'num_workers': num_workers,
      'first_batch_s': first_batch_s,
      'warmup_batches': warmup_batches,
      'examples': examples,
      'total_s': total,
      'examples_per_s': examples / total,
      'ms_per_batch': 1e3 * total / batches,
      'median_ms_per_batch': 1e3 * statistics.median(times),
      'mb_per_batch': nbytes / 1e6,
      'batch_times_s': times,
  }


# --------------------------------------------------------------- per op


def _segment_arrays(
    ann: dict[str, Any], meta: coco_panoptic.PanopticMetadata
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(ids, class, is_thing, crowd) of one annotation's segments_info."""
  segs = ann['segments_info']
  cat_to_class = meta.category_id_to_class
  classes = np.array(
      [cat_to_class.get(int(s['category_id']), 0) for s in segs], np.int32
  )
  return (
      np.array([int(s['id']) for s in segs], np.int64),
      classes,
      meta.is_thing[classes],
      np.array([bool(s.get('iscrowd', 0)) for s in segs], np.bool_),
  )


def run_ops(
    image_path: str,
    png_path: str,
    segments: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
    *,
    image_size: int,
    mask_size: int,
    max_instances: int,
    scale_range: tuple[float, float],
    flip: bool,
    color_jitter: float,
    loss_weight_power: float,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Reads and preprocesses one example op by op, timing each op.

  The ops and their order (hence the random draws) are those of
  `CocoPanopticSource.__getitem__` followed by `preprocess_train`, so the
  result equals theirs for the same rng.

  Args:
    image_path: the example's JPEG.
    png_path: its panoptic PNG.
    segments: (ids, class, is_thing, crowd) arrays of its segments_info.
    rng: randomness source.
    image_size: S.
    mask_size: m.
    max_instances: instance ids come from 1..max_instances-1.
    scale_range: large-scale jitter range.
    flip: random flip on/off.
    color_jitter: colour jitter strength.
    loss_weight_power: p of the loss weights.

  Returns:
    ({op name in OPS: (wall seconds, CPU seconds of this thread)},
    outputs: image float32 [S, S, 3], semantic/instance int32 [m, m],
    loss_weight float32 [m, m]).
  """
  times: dict[str, tuple[float, float]] = {}

  def timed(name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    t, c = time.perf_counter(), time.thread_time()
    out = fn(*args, **kw)
    times[name] = (time.perf_counter() - t, time.thread_time() - c)
    return out

  image = timed('decode_jpeg', panoptic_format.read_rgb_image, image_path)
  rgb = timed('decode_png', panoptic_format.read_rgb_image, png_path)

  def ids_to_maps(rgb: np.ndarray) -> dict[str, np.ndarray]:
    maps, _ = coco_panoptic.segments_to_maps(
        panoptic_format.rgb_to_id(rgb), *segments
    )
    return maps

  ex = {'image': image, **timed('panoptic_ids', ids_to_maps, rgb)}
  if flip:
    ex = timed('flip', preprocess.random_flip, ex, rng)
  else:
    times['flip'] = (0.0, 0.0)
  ex = timed(
      'lsj', preprocess.large_scale_jitter, ex, rng, output_size=image_size,
      scale_range=tuple(scale_range),
  )
  img = timed(
      'color_jitter',
      lambda x: preprocess.color_jitter(
          x.astype(np.float32) / 255.0, rng, color_jitter
      ),
      ex['image'],
  )
  sem, inst, valid = timed(
      'mask_resize',
      lambda: [
          preprocess.resize_labels(ex[k], mask_size)
          for k in ('semantic', 'instance', 'valid')
      ],
  )
  inst, sem = timed(
      'instance_ids', preprocess.assign_random_instance_ids, inst, rng,
      max_instances, semantic=sem,
  )
  weight = timed(
      'loss_weights', preprocess.loss_weights, sem, inst, loss_weight_power,
      valid,
  )
  # preprocess_train ends with astype casts, which copy even when the dtype
  # already matches (12 MB for a 1024^2 float image).
  out = timed(
      'output_casts',
      lambda: {
          'image': img.astype(np.float32),
          'semantic': sem.astype(np.int32),
          'instance': inst.astype(np.int32),
          'loss_weight': weight.astype(np.float32),
      },
  )
  return times, out


def time_ops(
    source: coco_panoptic.CocoPanopticSource,
    *,
    num_examples: int,
    repeats: int,
    seed: int,
    **preprocess_kwargs: Any,
) -> dict[str, Any]:
  """Mean and median ms of every op, and of the whole read + preprocess.

  Args:
    source: the fixture's source (its JSON gives the files and segments).
    num_examples: first n examples used (>= 1, at most len(source)).
    repeats: runs per example, each with new random draws (>= 1).
    seed: base seed of the draws.
    **preprocess_kwargs: those of `train_preprocess_fn`.

  Returns:
    `ops`: {name: {mean_ms, median_ms (wall), cpu_mean_ms (CPU time of
    this thread, which other processes on the machine do not inflate)}} in
    OPS order; `sum_mean_ms` and `sum_cpu_mean_ms` over the ops;
    `read_example_mean_ms` (`source[i]`) and
    `preprocess_train_mean_ms` timed as whole calls; `examples`, `repeats`.

  Raises:
    ValueError: on a bad count (names the flag).
  """
  if not 1 <= num_examples <= len(source):
    raise ValueError(
        f'--op_examples must be in [1, {len(source)}], got {num_examples}.'
    )
  if repeats < 1:
    raise ValueError(f'--op_repeats must be >= 1, got {repeats}.')
  meta = source.metadata
  content = panoptic_format.load_panoptic_json(meta.gt_json)
  files = {int(im['id']): im['file_name'] for im in content['images']}
  preprocess_fn = train_preprocess_fn(**preprocess_kwargs)
  per_op: dict[str, list[tuple[float, float]]] = {name: [] for name in OPS}
  read_s, full_s = [], []
  for i, ann in enumerate(content['annotations'][:num_examples]):
    image_path = os.path.join(meta.image_folder, files[int(ann['image_id'])])
    png_path = os.path.join(meta.gt_folder, ann['file_name'])
    segments = _segment_arrays(ann, meta)
    for r in range(repeats):
      times, _ = run_ops(
          image_path, png_path, segments, np.random.default_rng([seed, i, r]),
          **preprocess_kwargs,
      )
      for name in OPS:
        per_op[name].append(times[name])
      t = time.perf_counter()
      raw = source[i]
      read_s.append(time.perf_counter() - t)
      t = time.perf_counter()
      preprocess_fn(raw, np.random.default_rng([seed, i, r]))
      full_s.append(time.perf_counter() - t)
  ops = {}
  for name, v in per_op.items():
    wall, cpu = np.array(v).T
    ops[name] = {
        'mean_ms': 1e3 * float(np.mean(wall)),
        'median_ms': 1e3 * float(np.median(wall)),
        'cpu_mean_ms': 1e3 * float(np.mean(cpu)),
    }
  return {
      'examples': num_examples,
      'repeats': repeats,
      'ops': ops,
      'sum_mean_ms': sum(o['mean_ms'] for o in ops.values()),
      'sum_cpu_mean_ms': sum(o['cpu_mean_ms'] for o in ops.values()),
      'read_example_mean_ms': 1e3 * float(np.mean(read_s)),
      'preprocess_train_mean_ms': 1e3 * float(np.mean(full_s)),
  }


# ------------------------------------------------------------- benchmark


def run_throughput(
    data_dir: str,
    *,
    num_images: int = 64,
    fixture_size: tuple[int, int] = (640, 480),
    num_workers: Sequence[int] = (0, 1, 2),
    batch_size: int = 8,
    batches: int = 10,
    warmup_batches: int | None = None,
    image_size: int = 1024,
    mask_size: int = 256,
    scale_range: tuple[float, float] = (0.1, 2.0),
    flip: bool = True,
    color_jitter: float = 1.0,
    max_instances: int = 101,
    loss_weight_power: float = 0.2,
    op_examples: int = 8,
    op_repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
  """Writes (or reuses) the fixture and measures loader rates and op costs.

  Args:
    data_dir: parent folder of the fixture.
    num_images: fixture images.
    fixture_size: (long, short) image sides.
    num_workers: worker counts to time, one loader each.
    batch_size: examples per batch.
    batches: timed batches per worker count.
    warmup_batches: untimed batches; None = automatic (see `time_loader`).
    image_size: S of preprocess_train.
    mask_size: m of preprocess_train.
    scale_range: large-scale jitter range.
    flip: random flip.
    color_jitter: colour jitter strength.
    max_instances: instance id range.
    loss_weight_power: p of the loss weights.
    op_examples: examples of the per-op breakdown.
    op_repeats: runs per example in the per-op breakdown.
    seed: fixture, loader and op seed.

  Returns:
    JSON-serialisable dict: `setup` (arguments, fixture root and stats, CPU
    count, load average before/after), `loader` (one `time_loader` dict per
    worker count) and `ops` (`time_ops`).

  Raises:
    ValueError: on invalid arguments (names the flag).
  """
  if not num_workers:
    raise ValueError('--num_workers must list at least one count.')
  if batch_size < 1 or num_images < batch_size:
    raise ValueError(
        f'--batch_size must be in [1, --num_images={num_images}], got '
        f'{batch_size}.'
    )
  lo, hi = scale_range
  if not 0 < lo <= hi:
    raise ValueError(f'--scale_range must have 0 < min <= max, got '
                     f'{scale_range}.')
  if image_size < 1 or mask_size < 1 or image_size % mask_size:
    raise ValueError(
        f'--image_size ({image_size}) must be a positive multiple of '
        f'--mask_size ({mask_size}).'
    )
  load_start = os.getloadavg()[0]
  long_side, short_side = fixture_size
  root = ensure_fixture(
      data_dir, num_images=num_images, long_side=long_side,
      short_side=short_side, seed=seed,
  )
  source = data_lib.get_source('coco_panoptic', data_dir=root, split='train')
  kwargs = dict(
      image_size=image_size, mask_size=mask_size, max_instances=max_instances,
      scale_range=(float(lo), float(hi)), flip=flip,
      color_jitter=color_jitter, loss_weight_power=loss_weight_power,
  )
  preprocess_fn = train_preprocess_fn(**kwargs)
  loader = []
  for workers in num_workers:
    logging.info('Timing the train loader with %d worker(s).', workers)
    loader.append(
        time_loader(
            source, preprocess_fn, batch_size=batch_size, num_workers=workers,
            batches=batches, warmup_batches=warmup_batches, seed=seed,
        )
    )
  logging.info('Timing the preprocessing ops.')
  ops = time_ops(
      source, num_examples=min(op_examples, len(source)), repeats=op_repeats,
      seed=seed, **kwargs,
  )
  return {
      'setup': {
          **kwargs,
          'scale_range': [float(lo), float(hi)],
          'num_images': num_images,
          'fixture_size': [long_side, short_side],
          'batch_size': batch_size,
          'batches': batches,
          'seed': seed,
          'cpu_count': os.cpu_count(),
          # 1-minute load average before and after: other processes on the
          # machine lower the loader rates and inflate wall times.
          'load_average': [load_start, os.getloadavg()[0]],
          'fixture_root': root,
          'fixture': fixture_stats(root),
      },
      'loader': loader,
      'ops': ops,
  }


def format_table(results: dict[str, Any]) -> str:
  """The loader rates and the per-op costs as aligned text tables."""
  su, ops = results['setup'], results['ops']
  fx = su['fixture']
  lines = [
      f"fixture: {fx['num_images']} images {su['fixture_size'][0]}x"
      f"{su['fixture_size'][1]}, JPEG {fx['jpeg_mean_kb']:.0f} kB, PNG "
      f"{fx['png_mean_kb']:.0f} kB, {fx['segments_mean']:.1f} segments "
      f"({fx['segments_min']}-{fx['segments_max']})",
      f"preprocess: image {su['image_size']}, mask {su['mask_size']}, LSJ "
      f"{su['scale_range']}, flip {su['flip']}, colour jitter "
      f"{su['color_jitter']}; batch {su['batch_size']}, "
      f"{su['batches']} timed batches; {su['cpu_count']} CPUs, load "
      f"average {su['load_average'][0]:.1f} -> {su['load_average'][1]:.1f}",
      '',
      f"{'workers':>7}  {'examples/s':>10}  {'ms/batch':>9}  "
      f"{'MB/batch':>8}  {'first batch s':>13}",
  ]
  for r in results['loader']:
    lines.append(
        f"{r['num_workers']:>7}  {r['examples_per_s']:>10.2f}  "
        f"{r['ms_per_batch']:>9.1f}  {r['mb_per_batch']:>8.1f}  "
        f"{r['first_batch_s']:>13.2f}"
    )
  cpu_total = ops['sum_cpu_mean_ms']
  lines += [
      '',
      f"per example ({ops['examples']} examples x {ops['repeats']} draws; "
      'share of CPU time):',
      f"{'op':<13}  {'mean ms':>8}  {'median ms':>9}  {'CPU ms':>7}  "
      f"{'share':>6}  what",
  ]
  for name in OPS:
    o = ops['ops'][name]
    lines.append(
        f"{name:<13}  {o['mean_ms']:>8.2f}  {o['median_ms']:>9.2f}  "
        f"{o['cpu_mean_ms']:>7.2f}  "
        f"{100 * o['cpu_mean_ms'] / max(cpu_total, 1e-12):>5.1f}%  "
        f"{_OP_HELP[name]}"
    )
  full = ops['read_example_mean_ms'] + ops['preprocess_train_mean_ms']
  lines += [
      f"{'sum of ops':<13}  {ops['sum_mean_ms']:>8.2f}  {'':>9}  "
      f"{cpu_total:>7.2f}",
      f"whole calls: source[i] {ops['read_example_mean_ms']:.2f} ms + "
      f"preprocess_train {ops['preprocess_train_mean_ms']:.2f} ms = "
      f"{full:.2f} ms -> {1e3 / full:.1f} examples/s per core",
      f"CPU time of the ops {cpu_total:.2f} ms -> "
      f"{1e3 / max(cpu_total, 1e-12):.1f} examples/s per unshared core",
  ]
  return '\n'.join(lines)


# ------------------------------------------------------------------- CLI


def define_flags(
    flag_values: flags.FlagValues = flags.FLAGS,
) -> dict[str, Any]:
  """Defines the CLI's flags in `flag_values`; returns their holders.

  Called only when run as a program (or by tests on their own FlagValues),
  so importing the module adds nothing to absl's global FLAGS.
  """
  fv = {'flag_values': flag_values}
  return dict(
      data_dir=flags.DEFINE_string(
          'data_dir', None,
          'Parent folder of the fixture (reused when the parameters match); '
          'default: a temporary folder removed at exit.', **fv),
      num_images=flags.DEFINE_integer(
          'num_images', 64, 'Fixture images.', lower_bound=1, **fv),
      fixture_size=flags.DEFINE_list(
          'fixture_size', ['640', '480'],
          'Long,short side of the fixture images (landscape and portrait '
          'alternate).', **fv),
      num_workers=flags.DEFINE_list(
          'num_workers', ['0', '1', '2'],
          'grain worker counts to time.', **fv),
      batch_size=flags.DEFINE_integer(
          'batch_size', 8, 'Examples per batch.', lower_bound=1, **fv),
      batches=flags.DEFINE_integer(
          'batches', 10, 'Timed batches per worker count.', lower_bound=1,
          **fv),
      warmup_batches=flags.DEFINE_integer(
          'warmup_batches', None,
          'Untimed batches after the first; default 1 + workers * '
          f'{_WORKER_BUFFER_SIZE + 1}.', lower_bound=0, **fv),
      image_size=flags.DEFINE_integer(
          'image_size', 1024, 'Preprocessed image side.', lower_bound=1,
          **fv),
      mask_size=flags.DEFINE_integer(
          'mask_size', 256, 'Preprocessed mask side.', lower_bound=1, **fv),
      scale_range=flags.DEFINE_list(
          'scale_range', ['0.1', '2.0'],
          'Large-scale jitter range (min,max).', **fv),
      flip=flags.DEFINE_boolean('flip', True, 'Random flip.', **fv),
      color_jitter=flags.DEFINE_float(
          'color_jitter', 1.0, 'Colour jitter strength (0 = off).',
          lower_bound=0.0, **fv),
      max_instances=flags.DEFINE_integer(
          'max_instances', 101, 'Instance id range.', lower_bound=2, **fv),
      loss_weight_power=flags.DEFINE_float(
          'loss_weight_power', 0.2, 'p of the loss weights.', lower_bound=0.0,
          **fv),
      op_examples=flags.DEFINE_integer(
          'op_examples', 8, 'Examples in the per-op breakdown.',
          lower_bound=1, **fv),
      op_repeats=flags.DEFINE_integer(
          'op_repeats', 3, 'Random draws per example in the breakdown.',
          lower_bound=1, **fv),
      seed=flags.DEFINE_integer('seed', 0, 'Seed.', lower_bound=0, **fv),
      output=flags.DEFINE_string(
          'output', None, 'Write the results as JSON to this file.', **fv),
  )


def _numbers(cli: dict[str, Any], name: str, kind: type, count: int | None):
  values = cli[name].value
  try:
    out = [kind(v) for v in values]
  except ValueError:
    out = None
  if out is None or (count is not None and len(out) != count):
    what = f'{count} ' if count else ''
    raise ValueError(
        f"--{name}={','.join(values)}: expected {what}comma-separated "
        f'{kind.__name__}s.'
    )
  return out


def main(argv: Sequence[str], cli: dict[str, Any]) -> dict[str, Any]:
  """Runs the benchmark from parsed flags, prints the tables, writes JSON.

  Args:
    argv: positional arguments left by absl (only the program name).
    cli: the holders returned by `define_flags`.

  Returns:
    The results dict (also written to `--output` when given).
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    long_side, short_side = _numbers(cli, 'fixture_size', int, 2)
    scale_range = tuple(_numbers(cli, 'scale_range', float, 2))
    workers = _numbers(cli, 'num_workers', int, None)
    with tempfile.TemporaryDirectory(prefix='p2sd_throughput_') as tmp:
      results = run_throughput(
          cli['data_dir'].value or tmp,
          num_images=cli['num_images'].value,
          fixture_size=(long_side, short_side),
          num_workers=workers,
          batch_size=cli['batch_size'].value,
          batches=cli['batches'].value,
          warmup_batches=cli['warmup_batches'].value,
          image_size=cli['image_size'].value,
          mask_size=cli['mask_size'].value,
          scale_range=scale_range,
          flip=cli['flip'].value,
          color_jitter=cli['color_jitter'].value,
          max_instances=cli['max_instances'].value,
          loss_weight_power=cli['loss_weight_power'].value,
          op_examples=cli['op_examples'].value,
          op_repeats=cli['op_repeats'].value,
          seed=cli['seed'].value,
      )
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(format_table(results))
  if cli['output'].value:
    path = os.path.abspath(cli['output'].value)
    with open(path, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'wrote {path}')
  return results


def _app_main(argv: Sequence[str], cli: dict[str, Any]) -> None:
  # app.run passes a non-None return value to sys.exit, which would print
  # the results dict and exit with status 1.
  main(argv, cli)


if __name__ == '__main__':
  _cli = define_flags()
  app.run(functools.partial(_app_main, cli=_cli))
