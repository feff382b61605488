"""DAVIS 2017 video object segmentation read as clips of consecutive frames.

`DavisSource` reads the official DAVIS 2017 layout (as unzipped from
DAVIS-2017-trainval-480p.zip and DAVIS-2017-Unsupervised-trainval-480p.zip):

  <root>/JPEGImages/<resolution>/<sequence>/00000.jpg ...
  <root>/Annotations/<resolution>/<sequence>/00000.png ...   (semi-supervised)
  <root>/Annotations_unsupervised/<resolution>/<sequence>/...  (unsupervised)
  <root>/ImageSets/2017/{train,val}.txt   (one sequence name per line)

Annotations are palette PNGs whose pixel value is the object id: 0 is
background, 1..n the objects, 255 void. In the train and val sets every frame
has an annotation, so frames and annotations must pair up one to one.

Each pixel becomes the raw example contract of `CocoPanopticSource` so the
same preprocessing applies per frame: semantic 0 = void (value 255), 1 =
background, 2 = object; instance = the object id (exactly the palette index)
on object pixels, 0 elsewhere; crowd all False. `source[i]` is clip i:
`clip_length` consecutive frames of one sequence with a leading [L] axis.

`ClipSource` holds what any video source with this contract shares (clip
enumeration, whole-sequence access, skipping of bad examples); the TFDS
`davis` reader in `tfds_sources` builds on it. Registered as 'davis'. This
module imports the registry from the package, so the package imports it last.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath

from pix2seq_d_jax.data import register_source
from pix2seq_d_jax.data.source_api import (
  SPLITS,
  BadExampleError,
  PanopticMetadata,
  SkippingSource,
  check_count,
  metadata_from_categories,
)
from pix2seq_d_jax.formats import coco_panoptic as coco_format
from pix2seq_d_jax.formats import davis as davis_format
from pix2seq_d_jax.formats import paths

TASKS = ('unsupervised', 'semi-supervised')
VOID_ID = 255
# image_id of a clip = sequence_index * CLIP_ID_STRIDE + first frame index;
# DAVIS sequences have at most ~100 frames, and the id still fits in int32.
CLIP_ID_STRIDE = 100_000
# Class 1 and 2 of the contiguous layout (0 = void); the ids equal the class.
CATEGORIES = (
    {'id': 1, 'name': 'background', 'supercategory': 'background',
     'isthing': 0, 'color': [0, 0, 0]},
    {'id': 2, 'name': 'object', 'supercategory': 'object', 'isthing': 1,
     'color': [128, 0, 0]},
)
_ANNOTATION_FOLDERS = {
    'unsupervised': 'Annotations_unsupervised',
    'semi-supervised': 'Annotations',
}


def davis_metadata(
    *, gt_folder: str = '', image_folder: str = ''
) -> PanopticMetadata:
  """Returns the 3-class layout: void, background (stuff), object (thing).

  DAVIS has no panoptic JSON, so `gt_json` is ''; `gt_folder` and
  `image_folder` record the annotation and frame folders (the DAVIS J&F
  evaluator reads the dataset root, not these).
  """
  return metadata_from_categories(
      [dict(c) for c in CATEGORIES], gt_folder=gt_folder,
      image_folder=image_folder,
  )


def labels_from_ids(ids: np.ndarray) -> dict[str, np.ndarray]:
  """Maps DAVIS object ids to the raw label maps.

  Args:
    ids: integer [..., h, w] annotation values (0 background, 255 void, other
      values object ids).

  Returns:
    semantic int32 (0 void, 1 background, 2 object), instance int32 (the
    object id on object pixels, else 0) and crowd bool (all False), each of
    the shape of `ids`.
  """
  ids = np.asarray(ids)
  void = ids == VOID_ID
  background = ids == 0
  semantic = np.where(void, 0, np.where(background, 1, 2)).astype(np.int32)
  instance = np.where(void | background, 0, ids).astype(np.int32)
  return {
      'semantic': semantic,
      'instance': instance,
      'crowd': np.zeros(ids.shape, np.bool_),
  }


# One decoded frame: image uint8 [h, w, 3], ids [h, w], and the names of the
# image and the annotation for error messages.
Frame = tuple[np.ndarray, np.ndarray, str, str]


class ClipSource(SkippingSource):
  """Clips of consecutive frames over the sequences of one split.

  `source[i]` returns a dict of numpy arrays, L = clip_length:
    image: uint8 [L, H, W, 3].
    semantic: int32 [L, H, W], 0 = void, 1 = background, 2 = object.
    instance: int32 [L, H, W], the object id on object pixels, else 0.
    crowd: bool [L, H, W], all False.
    sequence_index: int32 [], position of the sequence in `sequence_names`.
    frame_index: int32 [L], positions of the frames in the sequence.
    image_id: int64 [], sequence_index * CLIP_ID_STRIDE + first frame index
      (unique per clip).
    height / width: int32 [], the frame size.
  clip_length=1 gives single frames, still with the leading [1] axis.
  Clips enumerate every start 0..T-L of every sequence in sequence order; a
  sequence shorter than L gives no clip. `read_sequence(name)` returns the
  same fields over all frames of a sequence (for evaluation).

  Subclasses set `split` and `metadata`, call `_init_clips` and implement
  `_load_frames` and `_where`.
  """

  def _init_clips(
      self,
      names: Sequence[str],
      frame_names: Sequence[Sequence[str]],
      *,
      clip_length: int,
      max_examples: int | None,
      skip_bad_examples: bool,
  ) -> None:
    """Indexes the clips of the given sequences (no file I/O)."""
    if clip_length < 1:
      raise ValueError(f'clip_length must be >= 1, got {clip_length}.')
    check_count(max_examples, 'max_examples')
    self._init_skipping(skip_bad_examples)
    self.clip_length = int(clip_length)
    self._names = list(names)
    self._seq_index = {n: i for i, n in enumerate(self._names)}
    self._frame_names = [list(f) for f in frame_names]
    for i, frames in enumerate(self._frame_names):
      if len(frames) >= CLIP_ID_STRIDE:
        raise ValueError(
            f'Sequence {self._names[i]!r} has {len(frames)} frames; at most '
            f'{CLIP_ID_STRIDE - 1} keep clip image ids unique.'
        )
    starts = [
        (s, t)
        for s, frames in enumerate(self._frame_names)
        for t in range(len(frames) - self.clip_length + 1)
    ]
    if max_examples is not None:
      starts = starts[:max_examples]
    self._clips = np.array(starts, np.int32).reshape(-1, 2)

  @property
  def sequence_names(self) -> list[str]:
    """Names of the sequences of the split, in sequence_index order."""
    return list(self._names)

  def _index_of(self, name: str) -> int:
    if name not in self._seq_index:
      shown = self._names[:10] + (['...'] if len(self._names) > 10 else [])
      raise ValueError(
          f'Unknown sequence {name!r} in split {self.split!r}; known: '
          f'{shown}.'
      )
    return self._seq_index[name]

  def num_frames(self, name: str) -> int:
    """Number of frames of sequence `name`.

    Raises:
      ValueError: for a name not in `sequence_names`.
    """
    return len(self._frame_names[self._index_of(name)])

  def frame_names(self, name: str) -> list[str]:
    """Frame names of sequence `name` (file stems, e.g. '00000').

    Raises:
      ValueError: for a name not in `sequence_names`.
    """
    return list(self._frame_names[self._index_of(name)])

  def __len__(self) -> int:
    return len(self._clips)

  def clip_starts(self) -> np.ndarray:
    """Returns int32 [len(self), 2]: (sequence_index, first frame) per clip."""
    return self._clips.copy()

  def read_sequence(self, name: str) -> dict[str, np.ndarray]:
    """Reads every frame of sequence `name` (fields as `source[i]`).

    Raises:
      ValueError: for a name not in `sequence_names`.
      BadExampleError: if a frame is bad (never skipped: an evaluation needs
        the whole sequence).
    """
    s = self._index_of(name)
    return self._example(s, list(range(len(self._frame_names[s]))))

  def _read(self, index: int) -> dict[str, np.ndarray]:
    s, start = (int(v) for v in self._clips[index])
    return self._example(s, list(range(start, start + self.clip_length)))

  @abc.abstractmethod
  def _load_frames(
      self, seq_index: int, frame_indices: list[int]
  ) -> list[Frame]:
    """Decodes the frames; raises BadExampleError naming the bad file."""

  def _example(
      self, seq_index: int, frame_indices: list[int]
  ) -> dict[str, np.ndarray]:
    frames = self._load_frames(seq_index, frame_indices)
    size = frames[0][0].shape[:2]
    for image, ids, image_name, label_name in frames:
      if image.shape[:2] != ids.shape:
        raise BadExampleError(
            f'DAVIS frame {image_name} has size {image.shape[:2]} but its '
            f'annotation {label_name} has size {ids.shape}.'
        )
      if image.shape[:2] != size:
        raise BadExampleError(
            f'DAVIS frame {image_name} has size {image.shape[:2]} but frame '
            f'{frames[0][2]} of the same sequence has size {size}.'
        )
    return {
        'image': np.stack([f[0] for f in frames]),
        **labels_from_ids(np.stack([f[1] for f in frames])),
        'sequence_index': np.asarray(seq_index, np.int32),
        'frame_index': np.asarray(frame_indices, np.int32),
        'image_id': np.asarray(
            seq_index * CLIP_ID_STRIDE + frame_indices[0], np.int64
        ),
        'height': np.asarray(size[0], np.int32),
        'width': np.asarray(size[1], np.int32),
    }


def _stems(folder: str, ext: str) -> list[str]:
  return sorted(
      os.path.splitext(f)[0] for f in paths.listdir(folder) if f.endswith(ext)
  )


class DavisSource(ClipSource):
  """DAVIS 2017 folder-layout reader (grain RandomAccessDataSource protocol).

  Examples are clips, see `ClipSource`. Sequences come in ImageSets order;
  frames are the sorted `.jpg` stems of a sequence, each paired with the
  `.png` of the same stem in the task's annotation folder.

  At construction a missing sequence folder (FileNotFoundError) or frames
  and annotations that do not pair up (BadExampleError) raise, naming the
  folder; with `skip_bad_examples=True` such sequences are left out with a
  warning and listed in `skipped_sequences`. An undecodable file or an
  image/annotation size mismatch raises BadExampleError when the clip is
  read, or skips the clip (see `SkippingSource`).

  `repr()` names the split, task and sizes but no path: grain stores it in
  the iterator state and checks it on restore.
  """

  def __init__(
      self,
      root: str,
      split: str,
      *,
      task: str = 'unsupervised',
      resolution: str = '480p',
      clip_length: int = 1,
      max_sequences: int | None = None,
      max_examples: int | None = None,
      skip_bad_examples: bool = False,
  ):
    """Indexes the split (lists folders; decodes nothing).

    Args:
      root: DAVIS root holding `JPEGImages/`, the annotation folder and
        `ImageSets/`.
      split: 'train' or 'val'.
      task: 'unsupervised' (`Annotations_unsupervised/`) or
        'semi-supervised' (`Annotations/`).
      resolution: '480p' or 'Full-Resolution' (the sub-folder name).
      clip_length: frames per example (>= 1).
      max_sequences: keep only the first n sequences of ImageSets.
      max_examples: keep only the first n clips.
      skip_bad_examples: leave out bad sequences and skip bad clips instead
        of raising.

    Raises:
      ValueError: on a bad split, task, count or clip_length, or an ImageSets
        file that lists no sequence or one sequence twice.
      FileNotFoundError: if the root, ImageSets file, frame or annotation
        folder, or (unless skipped) a listed sequence's folder is missing.
      BadExampleError: (unless skipped) if a sequence's frames and
        annotations do not pair up.
    """
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
    if task not in TASKS:
      raise ValueError(f'task must be one of {TASKS}, got {task!r}.')
    check_count(max_sequences, 'max_sequences')
    if not paths.isdir(root):
      raise FileNotFoundError(
          'DAVIS root not found: '
          f'{repr(paths.absolute(root)) if root else "an empty path"}; '
          'set --config.input.data_dir=DIR to the DAVIS folder')
    image_set = os.path.join(root, 'ImageSets', '2017', f'{split}.txt')
    image_root = os.path.join(root, 'JPEGImages', resolution)
    label_root = os.path.join(root, _ANNOTATION_FOLDERS[task], resolution)
    if not paths.isfile(image_set):
      raise FileNotFoundError(f'DAVIS ImageSets file not found: {image_set}')
    for folder, what in ((image_root, 'frame'), (label_root, task)):
      if not paths.isdir(folder):
        raise FileNotFoundError(
            f'DAVIS {what} folder not found: {folder}'
        )
    names = _read_image_set(image_set)
    if max_sequences is not None:
      names = names[:max_sequences]

    self.split = split
    self.task = task
    self.resolution = resolution
    self.root = root
    self.metadata = davis_metadata(
        gt_folder=label_root, image_folder=image_root
    )
    self.skipped_sequences: list[str] = []
    kept, frame_names = [], []
    for name in names:
      try:
        frame_names.append(
            _pair_frames(name, image_set, image_root, label_root)
        )
        kept.append(name)
      except (FileNotFoundError, BadExampleError) as e:
        if not skip_bad_examples:
          raise
        self.skipped_sequences.append(name)
        logging.warning('Skipping DAVIS sequence %r: %s', name, e)
    if names and not kept:
      raise BadExampleError(f'All sequences listed in {image_set} are bad.')
    self._image_set = image_set
    self._init_clips(
        kept, frame_names, clip_length=clip_length,
        max_examples=max_examples, skip_bad_examples=skip_bad_examples,
    )

  def __repr__(self) -> str:
    return (
        f'DavisSource(split={self.split!r}, task={self.task!r}, '
        f'resolution={self.resolution!r}, clip_length={self.clip_length}, '
        f'num_sequences={len(self._names)}, num_clips={len(self)})'
    )

  def _where(self) -> str:
    return self._image_set

  def _load_frames(
      self, seq_index: int, frame_indices: list[int]
  ) -> list[Frame]:
    name = self._names[seq_index]
    frames = []
    for t in frame_indices:
      stem = self._frame_names[seq_index][t]
      image_path = os.path.join(
          self.metadata.image_folder, name, f'{stem}.jpg'
      )
      label_path = os.path.join(self.metadata.gt_folder, name, f'{stem}.png')
      try:
        image = coco_format.read_rgb_image(image_path)
        ids = davis_format.read_palette_png(label_path)
      except (FileNotFoundError, ValueError) as e:
        raise BadExampleError(str(e)) from e
      frames.append((image, ids, image_path, label_path))
    return frames


def _read_image_set(path: str) -> list[str]:
  """Reads an ImageSets file: one sequence name per non-empty line."""
  text = epath.Path(path).read_text(encoding='utf-8')
  names = [line.strip() for line in text.splitlines() if line.strip()]
  if not names:
    raise ValueError(f'DAVIS ImageSets file {path} lists no sequence.')
  seen = set()
  for name in names:
    if name in seen:
      raise ValueError(f'{path}: sequence {name!r} is listed twice.')
    seen.add(name)
  return names


def _pair_frames(
    name: str, image_set: str, image_root: str, label_root: str
) -> list[str]:
  """Returns the frame stems of a sequence, checking they pair up."""
  image_dir = os.path.join(image_root, name)
  label_dir = os.path.join(label_root, name)
  for folder in (image_dir, label_dir):
    if not paths.isdir(folder):
      raise FileNotFoundError(
          f'Folder of sequence {name!r} (listed in {image_set}) not found: '
          f'{folder}'
      )
  images = _stems(image_dir, '.jpg')
  labels = _stems(label_dir, '.png')
  if not images:
    raise BadExampleError(f'DAVIS frame folder {image_dir} has no .jpg file.')
  if images != labels:
    unpaired = sorted(set(images) ^ set(labels))
    raise BadExampleError(
        f'DAVIS sequence {name!r}: {len(images)} frames in {image_dir} but '
        f'{len(labels)} annotations in {label_dir} (unpaired: '
        f'{unpaired[:5]}).'
    )
  return images


@register_source('davis')
def _davis(
    *,
    data_dir: str,
    split: str,
    task: str = 'unsupervised',
    resolution: str = '480p',
    clip_length: int = 1,
    max_sequences: int | None = None,
    max_examples: int | None = None,
    skip_bad_examples: bool = False,
) -> DavisSource:
  """DAVIS 2017 read from `data_dir` (see DavisSource)."""
  return DavisSource(
      data_dir,
      split,
      task=task,
      resolution=resolution,
      clip_length=clip_length,
      max_sequences=max_sequences,
      max_examples=max_examples,
      skip_bad_examples=skip_bad_examples,
  )
