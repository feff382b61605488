"""Random-access reader of KITTI-STEP video panoptic segmentation.

Reads the layout that deeplab2 documents for KITTI-STEP
(`g3doc/setup/kitti_step.md`: KITTI's `training/image_02/<seq>` folders moved
to `images/{train,val}/`, the ground truth from `kitti-step.tar.gz`):

  <root>/images/{split}/<seq:04d>/<frame:06d>.png
  <root>/panoptic_maps/{split}/<seq:04d>/<frame:06d>.png

A panoptic map PNG stores R = Cityscapes train id (0..18, 255 = void) and
G * 256 + B = track id, consistent over the frames of a sequence; it is 0 for
stuff, void, and for person/car pixels that KITTI-MOTS did not annotate, which
deeplab2's STQ treats as crowd. KITTI-STEP tracks two thing classes, person
(11) and car (13); the other 17 classes are stuff (also rider, truck, ...).

`KittiStepSource[i]` is clip i: `clip_length` consecutive frames of one
sequence (every start of every sequence, sequences in sorted order), with the
raw example contract of `CocoPanopticSource` per frame plus a leading [L]
axis. Classes are train id + 1 (0 = void), so they line up with the
Cityscapes panoptic source. Evaluation reads whole sequences with
`read_sequence` / `iter_sequence`. Registered as the data source 'kitti_step'.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from pix2seq_d_jax.data import register_source
from pix2seq_d_jax.data.source_api import (
  SPLITS,
  BadExampleError,
  PanopticMetadata,
  SkippingSource,
  metadata_from_categories,
)
from pix2seq_d_jax.formats import coco_panoptic as coco_format
from pix2seq_d_jax.formats import kitti_step as step_format
from pix2seq_d_jax.formats import paths

VOID_TRAIN_ID = 255
THING_TRAIN_IDS = (11, 13)  # person, car: the classes STEP tracks.
# The 19 Cityscapes train classes in train-id order, with their Cityscapes
# label ids as category ids (as cityscapesScripts' panoptic JSON).
_CLASSES = (
    (7, 'road'), (8, 'sidewalk'), (11, 'building'), (12, 'wall'),
    (13, 'fence'), (17, 'pole'), (19, 'traffic light'), (20, 'traffic sign'),
    (21, 'vegetation'), (22, 'terrain'), (23, 'sky'), (24, 'person'),
    (25, 'rider'), (26, 'car'), (27, 'truck'), (28, 'bus'), (31, 'train'),
    (32, 'motorcycle'), (33, 'bicycle'),
)
NUM_TRAIN_IDS = len(_CLASSES)
# Frame numbers are below this; image_id = int(sequence) * it + frame.
_FRAMES_PER_SEQUENCE_ID = 1_000_000
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def categories() -> list[dict]:
  """The 19 categories (Cityscapes label ids, STEP's two thing classes)."""
  return [
      {'id': cid, 'name': name, 'isthing': int(i in THING_TRAIN_IDS)}
      for i, (cid, name) in enumerate(_CLASSES)
  ]


def class_to_train_id(semantic: np.ndarray) -> np.ndarray:
  """Maps classes (0 = void, c = train id + 1) to train ids (void = 255)."""
  semantic = np.asarray(semantic)
  return np.where(semantic == 0, VOID_TRAIN_ID, semantic - 1).astype(np.int32)


def _sorted_numeric(names: list[str], folder: str, what: str) -> list[str]:
  for name in names:
    if not name.isdigit():
      raise ValueError(
          f'{os.path.join(folder, name)}: expected a numeric {what} name '
          '(e.g. 0002 or 000123).'
      )
  return sorted(names, key=int)


def _list_frames(folder: str) -> list[str]:
  stems = [f[:-4] for f in paths.listdir(folder) if f.endswith('.png')]
  stems = _sorted_numeric(stems, folder, 'frame')
  if stems and int(stems[-1]) >= _FRAMES_PER_SEQUENCE_ID:
    raise ValueError(
        f'{os.path.join(folder, stems[-1])}.png: frame numbers must be below '
        f'{_FRAMES_PER_SEQUENCE_ID} (they are part of image_id).'
    )
  return stems


def _rank(file_name: str) -> int:
  """Preference of an image file by extension (PNG first, as KITTI)."""
  return _IMAGE_EXTENSIONS.index(os.path.splitext(file_name)[1].lower())


class KittiStepSource(SkippingSource):
  """KITTI-STEP clip reader (grain RandomAccessDataSource protocol).

  Each `source[i]` returns a dict of numpy arrays for a clip of L =
  `clip_length` consecutive frames (L = 1 still has the [1] axis):
    image: uint8 [L, H, W, 3].
    semantic: int32 [L, H, W], train id + 1, 0 = void.
    instance: int32 [L, H, W], 1..k for the tracked person/car pixels,
      numbered in order of first appearance in the clip (frame by frame,
      ties by (class, track id)), so a track keeps its id over the clip; 0
      for stuff, void and crowd.
    crowd: bool [L, H, W], person/car pixels without a track id (deeplab2's
      STQ crowd rule); their semantic is their class, their instance 0.
    sequence_index: int32 [], the sequence's position in `sequence_names`.
    frame_index: int32 [L], frame numbers (the PNG names).
    image_id: int64 [], int(sequence name) * 10**6 + first frame number.
    height, width: int32 [], the frame size.

  Clips are every window of L consecutive frames (in file order) of every
  sequence, sequences in sorted order, so len = sum(max(0, T - L + 1)).
  Bad clips (missing or undecodable file, size mismatch, a class id that is
  neither a train id nor 255) raise `BadExampleError` naming the file, or
  with `skip_bad_examples=True` are replaced by the next good clip, as in
  `CocoPanopticSource`. `repr()` names no path (grain checks it on restore).
  """

  def __init__(
      self,
      root: str,
      split: str,
      *,
      clip_length: int = 1,
      max_sequences: int | None = None,
      max_examples: int | None = None,
      skip_bad_examples: bool = False,
  ):
    """Indexes the split (file names only, no image is read).

    Args:
      root: KITTI-STEP root holding `images/` and `panoptic_maps/`.
      split: 'train' or 'val'.
      clip_length: frames per example (>= 1).
      max_sequences: keep only the first n sequences (sorted).
      max_examples: keep only the first n clips.
      skip_bad_examples: substitute bad clips instead of raising.

    Raises:
      ValueError: on a bad argument, a non-numeric sequence or frame name,
        a sequence without frames, or a split without sequences.
      FileNotFoundError: if the root, a split folder or a sequence's image
        folder is missing.
    """
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
    if not isinstance(clip_length, int) or clip_length < 1:
      raise ValueError(f'clip_length must be an int >= 1, got {clip_length!r}.')
    for name, value in (('max_sequences', max_sequences),
                        ('max_examples', max_examples)):
      if value is not None and value < 0:
        raise ValueError(f'{name} must be >= 0, got {value}.')
    if not paths.isdir(root):
      raise FileNotFoundError(
          'KITTI-STEP root not found: '
          f'{repr(paths.absolute(root)) if root else "an empty path"}; '
          'set --config.input.data_dir=DIR to the KITTI-STEP folder')
    gt_folder = os.path.join(root, 'panoptic_maps', split)
    image_folder = os.path.join(root, 'images', split)
    for folder, what in ((gt_folder, 'panoptic map'), (image_folder, 'image')):
      if not paths.isdir(folder):
        raise FileNotFoundError(f'{what} folder not found: {folder}')
    names = [d for d in paths.listdir(gt_folder)
             if paths.isdir(os.path.join(gt_folder, d))]
    names = _sorted_numeric(names, gt_folder, 'sequence')
    if not names:
      raise ValueError(f'no sequence folders in {gt_folder}.')
    if max_sequences is not None:
      names = names[:max_sequences]

    self._frames: dict[str, tuple[str, ...]] = {}
    self._images: dict[str, dict[str, str]] = {}
    for name in names:
      seq_images = os.path.join(image_folder, name)
      if not paths.isdir(seq_images):
        raise FileNotFoundError(
            f'image folder of sequence {name!r} not found: {seq_images}'
        )
      frames = _list_frames(os.path.join(gt_folder, name))
      if not frames:
        raise ValueError(
            f'no PNG frames in {os.path.join(gt_folder, name)}.'
        )
      self._frames[name] = tuple(frames)
      # Image file per frame stem; KITTI has PNGs, other STEP sets JPEGs.
      by_stem: dict[str, str] = {}
      for f in paths.listdir(seq_images):
        stem, ext = os.path.splitext(f)
        rank = _IMAGE_EXTENSIONS.index(ext.lower()) if (
            ext.lower() in _IMAGE_EXTENSIONS) else None
        current = by_stem.get(stem)
        if rank is not None and (current is None or rank < _rank(current)):
          by_stem[stem] = f
      self._images[name] = by_stem

    self.split = split
    self.clip_length = clip_length
    self.sequence_names = tuple(names)
    self._init_skipping(skip_bad_examples)
    self.metadata: PanopticMetadata = metadata_from_categories(
        categories(), gt_folder=gt_folder, image_folder=image_folder
    )
    clips = [
        (s, start)
        for s, name in enumerate(names)
        for start in range(len(self._frames[name]) - clip_length + 1)
    ]
    if max_examples is not None:
      clips = clips[:max_examples]
    self._clips = np.array(clips, np.int64).reshape(-1, 2)

  def __len__(self) -> int:
    return len(self._clips)

  def __repr__(self) -> str:
    return (
        f'KittiStepSource(split={self.split!r}, '
        f'clip_length={self.clip_length}, num_examples={len(self)}, '
        f'num_sequences={len(self.sequence_names)})'
    )

  def num_frames(self, name: str) -> int:
    """Frames of sequence `name` (no file I/O)."""
    return len(self._frames[self._check_name(name)])

  def frame_names(self, name: str) -> list[str]:
    """Frame names (e.g. '000123', the PNG stems) of sequence `name`."""
    return list(self._frames[self._check_name(name)])

  def _check_name(self, name: str) -> str:
    if name not in self._frames:
      raise KeyError(
          f'unknown sequence {name!r}; known: {list(self.sequence_names)}'
      )
    return name

  def _where(self) -> str:
    return f'KITTI-STEP {self.metadata.gt_folder}'

  def _read(self, index: int) -> dict[str, np.ndarray]:
    seq, start = (int(v) for v in self._clips[index])
    name = self.sequence_names[seq]
    stems = self._frames[name][start:start + self.clip_length]
    frames = [self._read_frame(name, stem) for stem in stems]
    return self._stack(seq, name, stems, frames)

  def read_sequence(self, name: str) -> dict[str, np.ndarray]:
    """Reads every frame of sequence `name` as one clip (fields as `[i]`).

    Instance ids are consistent over the whole sequence. A long KITTI
    sequence (up to ~1000 frames) takes several GB this way; `iter_sequence`
    streams the same frames one at a time.

    Raises:
      KeyError: for an unknown sequence.
      BadExampleError: for any bad frame (never skipped).
    """
    stems = self._frames[self._check_name(name)]
    frames = [self._read_frame(name, stem) for stem in stems]
    return self._stack(self.sequence_names.index(name), name, stems, frames)

  def iter_sequence(self, name: str) -> Iterator[dict[str, np.ndarray]]:
    """Yields the frames of `name` in order as clips of one frame.

    Instance ids are numbered by first appearance over the whole sequence,
    exactly as `read_sequence` numbers them, and `image_id` is each frame's
    own id.

    Raises:
      KeyError: for an unknown sequence.
      BadExampleError: for any bad frame (never skipped).
    """
    seq = self.sequence_names.index(self._check_name(name))
    numbering: dict[int, int] = {}
    for stem in self._frames[name]:
      frame = self._read_frame(name, stem)
      yield self._stack(seq, name, (stem,), [frame], numbering)

  def _read_frame(
      self, name: str, stem: str
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (image, train ids, track ids) of one frame, validated."""
    png_path = os.path.join(self.metadata.gt_folder, name, f'{stem}.png')
    image_file = self._images[name].get(stem)
    image_path = os.path.join(
        self.metadata.image_folder, name, image_file or f'{stem}.png'
    )
    if image_file is None:
      raise BadExampleError(f'Image file not found: {image_path}')
    try:
      image = coco_format.read_rgb_image(image_path)
      train_ids, track_ids = step_format.read_step_png(png_path)
    except (FileNotFoundError, ValueError) as e:
      raise BadExampleError(str(e)) from e
    if image.shape[:2] != train_ids.shape:
      raise BadExampleError(
          f'Image {image_path} has size {image.shape[:2]} but its panoptic '
          f'map {png_path} has size {train_ids.shape}.'
      )
    bad = (train_ids >= NUM_TRAIN_IDS) & (train_ids != VOID_TRAIN_ID)
    if bad.any():
      raise BadExampleError(
          f'Panoptic map {png_path} has class ids '
          f'{np.unique(train_ids[bad]).tolist()}; expected train ids '
          f'0..{NUM_TRAIN_IDS - 1} or {VOID_TRAIN_ID} (void).'
      )
    return image, train_ids, track_ids

  def _stack(
      self,
      seq: int,
      name: str,
      stems: tuple[str, ...],
      frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
      numbering: dict[int, int] | None = None,
  ) -> dict[str, np.ndarray]:
    """Turns validated frames into the clip dict.

    `numbering` maps (class * 65536 + track id) to the instance id given so
    far; new tracks get the next ids. A fresh dict numbers within the clip;
    `iter_sequence` passes one dict through a whole sequence.
    """
    shapes = {f[1].shape for f in frames}
    if len(shapes) != 1:
      raise BadExampleError(
          f'Frames {list(stems)} of sequence {name} in '
          f'{self.metadata.gt_folder} differ in size: {sorted(shapes)}.'
      )
    numbering = {} if numbering is None else numbering
    semantic, instance, crowd = [], [], []
    for _, train_ids, track_ids in frames:
      thing = np.isin(train_ids, THING_TRAIN_IDS)
      tracked = thing & (track_ids > 0)
      keys = train_ids.astype(np.int64) * 65536 + track_ids
      uniq, inverse = np.unique(keys[tracked], return_inverse=True)
      for key in uniq.tolist():
        numbering.setdefault(key, len(numbering) + 1)
      inst = np.zeros(train_ids.shape, np.int32)
      lut = np.array([numbering[k] for k in uniq.tolist()], np.int32)
      inst[tracked] = lut[inverse.ravel()]
      semantic.append(
          np.where(train_ids == VOID_TRAIN_ID, 0, train_ids + 1)
      )
      instance.append(inst)
      crowd.append(thing & (track_ids == 0))
    h, w = frames[0][1].shape
    return {
        'image': np.stack([f[0] for f in frames]),
        'semantic': np.stack(semantic).astype(np.int32),
        'instance': np.stack(instance),
        'crowd': np.stack(crowd),
        'sequence_index': np.asarray(seq, np.int32),
        'frame_index': np.array([int(s) for s in stems], np.int32),
        'image_id': np.asarray(
            int(name) * _FRAMES_PER_SEQUENCE_ID + int(stems[0]), np.int64
        ),
        'height': np.asarray(h, np.int32),
        'width': np.asarray(w, np.int32),
    }


@register_source('kitti_step')
def _kitti_step(
    *,
    data_dir: str,
    split: str,
    max_examples: int | None = None,
    skip_bad_examples: bool = False,
    clip_length: int = 1,
    max_sequences: int | None = None,
) -> KittiStepSource:
  """KITTI-STEP read from `data_dir` (see KittiStepSource)."""
  return KittiStepSource(
      data_dir,
      split,
      clip_length=clip_length,
      max_sequences=max_sequences,
      max_examples=max_examples,
      skip_bad_examples=skip_bad_examples,
  )
