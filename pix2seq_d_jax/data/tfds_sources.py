"""Readers of TFDS datasets prepared as ArrayRecord, without TensorFlow.

A dataset prepared elsewhere (`tfds build ... --file_format=array_record`,
or `download_and_prepare` with that format) is opened with
`tfds.builder_from_directory` and read with `builder.as_data_source(split)`:
random access, no TensorFlow import. Records are fetched as raw bytes,
parsed with tfds' NumPy example parser, and only the images an example needs
are decoded, with PIL, exactly as the folder sources decode files, so a TFDS
source and a folder source give pixel-equal examples on the same data.

  'coco_panoptic_tfds': tfds `coco/2017_panoptic`, one example per image,
    the raw example contract of `CocoPanopticSource`.
  'davis_tfds': tfds `davis/480p` (or `davis/full_resolution`), clips of
    consecutive frames, the contract of `davis.ClipSource`.

`data_dir` is either the prepared version folder (holding
`dataset_info.json`, `features.json` and the `*.array_record-*` shards) or a
TFDS data dir holding `<name>/<config>/<version>/` (the newest version is
used). Splits are 'train' and 'val' ('validation' is accepted too). The
sources are picklable for grain workers: the open ArrayRecord reader is
dropped when pickling and reopened on first read.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import numpy as np
from absl import logging

from pix2seq_d_jax.data import register_source
from pix2seq_d_jax.data.coco_panoptic import segments_to_maps
from pix2seq_d_jax.data.davis import ClipSource, Frame, davis_metadata
from pix2seq_d_jax.data.source_api import (
    BadExampleError,
    SkippingSource,
    check_count,
    metadata_from_categories,
)
from pix2seq_d_jax.formats import coco_panoptic as coco_format
from pix2seq_d_jax.formats import davis as davis_format
from pix2seq_d_jax.formats import paths


def _tfds() -> Any:
  """`tensorflow_datasets`, imported on first use.

  The source registry loads this module in every training and prediction
  process; importing tfds there would cost each 0.3 s of start-up.
  """
  import tensorflow_datasets

  return tensorflow_datasets


# The 133 COCO panoptic categories (id, name) in the order of
# panoptic_{train,val}2017.json, which is the order of tfds'
# `panoptic_objects/label` ClassLabel. The 80 things (ids <= 90) come first;
# the ClassLabel has names only, so ids and isthing come from this table.
COCO_PANOPTIC_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, 'person'), (2, 'bicycle'), (3, 'car'), (4, 'motorcycle'),
    (5, 'airplane'), (6, 'bus'), (7, 'train'), (8, 'truck'), (9, 'boat'),
    (10, 'traffic light'), (11, 'fire hydrant'), (13, 'stop sign'),
    (14, 'parking meter'), (15, 'bench'), (16, 'bird'), (17, 'cat'),
    (18, 'dog'), (19, 'horse'), (20, 'sheep'), (21, 'cow'),
    (22, 'elephant'), (23, 'bear'), (24, 'zebra'), (25, 'giraffe'),
    (27, 'backpack'), (28, 'umbrella'), (31, 'handbag'), (32, 'tie'),
    (33, 'suitcase'), (34, 'frisbee'), (35, 'skis'), (36, 'snowboard'),
    (37, 'sports ball'), (38, 'kite'), (39, 'baseball bat'),
    (40, 'baseball glove'), (41, 'skateboard'), (42, 'surfboard'),
    (43, 'tennis racket'), (44, 'bottle'), (46, 'wine glass'), (47, 'cup'),
    (48, 'fork'), (49, 'knife'), (50, 'spoon'), (51, 'bowl'),
    (52, 'banana'), (53, 'apple'), (54, 'sandwich'), (55, 'orange'),
    (56, 'broccoli'), (57, 'carrot'), (58, 'hot dog'), (59, 'pizza'),
    (60, 'donut'), (61, 'cake'), (62, 'chair'), (63, 'couch'),
    (64, 'potted plant'), (65, 'bed'), (67, 'dining table'), (70, 'toilet'),
    (72, 'tv'), (73, 'laptop'), (74, 'mouse'), (75, 'remote'),
    (76, 'keyboard'), (77, 'cell phone'), (78, 'microwave'), (79, 'oven'),
    (80, 'toaster'), (81, 'sink'), (82, 'refrigerator'), (84, 'book'),
    (85, 'clock'), (86, 'vase'), (87, 'scissors'), (88, 'teddy bear'),
    (89, 'hair drier'), (90, 'toothbrush'),
    (92, 'banner'), (93, 'blanket'), (95, 'bridge'), (100, 'cardboard'),
    (107, 'counter'), (109, 'curtain'), (112, 'door-stuff'),
    (118, 'floor-wood'), (119, 'flower'), (122, 'fruit'), (125, 'gravel'),
    (128, 'house'), (130, 'light'), (133, 'mirror-stuff'), (138, 'net'),
    (141, 'pillow'), (144, 'platform'), (145, 'playingfield'),
    (147, 'railroad'), (148, 'river'), (149, 'road'), (151, 'roof'),
    (154, 'sand'), (155, 'sea'), (156, 'shelf'), (159, 'snow'),
    (161, 'stairs'), (166, 'tent'), (168, 'towel'), (171, 'wall-brick'),
    (175, 'wall-stone'), (176, 'wall-tile'), (177, 'wall-wood'),
    (178, 'water-other'), (180, 'window-blind'), (181, 'window-other'),
    (184, 'tree-merged'), (185, 'fence-merged'), (186, 'ceiling-merged'),
    (187, 'sky-other-merged'), (188, 'cabinet-merged'),
    (189, 'table-merged'), (190, 'floor-other-merged'),
    (191, 'pavement-merged'), (192, 'mountain-merged'),
    (193, 'grass-merged'), (194, 'dirt-merged'), (195, 'paper-merged'),
    (196, 'food-other-merged'), (197, 'building-other-merged'),
    (198, 'rock-merged'), (199, 'wall-other-merged'), (200, 'rug-merged'),
)
# COCO thing category ids are 1..90, stuff ids 92..200.
MAX_THING_ID = 90

_SPLITS = {'train': 'train', 'val': 'validation', 'validation': 'validation'}
_VERSION = re.compile(r'^\d+\.\d+\.\d+$')


def resolve_builder_dir(data_dir: str, name: str, config: str) -> str:
  """Finds the prepared TFDS folder of `name/config` under `data_dir`.

  Args:
    data_dir: a prepared version folder (with `dataset_info.json`) or a TFDS
      data dir holding `<name>/<config>/<version>/`.
    name: the builder name, e.g. 'davis'.
    config: the builder config, e.g. '480p'.

  Returns:
    The version folder; under a data dir the newest version.

  Raises:
    FileNotFoundError: if neither layout is found (names both paths).
  """
  if paths.isfile(os.path.join(data_dir, 'dataset_info.json')):
    return data_dir
  config_dir = os.path.join(data_dir, name, config)
  versions = []
  if paths.isdir(config_dir):
    versions = [
        v for v in paths.listdir(config_dir)
        if _VERSION.match(v)
        and paths.isfile(os.path.join(config_dir, v, 'dataset_info.json'))
    ]
  if not versions:
    raise FileNotFoundError(
        f'No prepared TFDS dataset {name}/{config}: expected '
        f'{os.path.join(data_dir, "dataset_info.json")} or '
        f'{os.path.join(config_dir, "<version>", "dataset_info.json")}.'
    )
  newest = max(versions, key=lambda v: tuple(int(p) for p in v.split('.')))
  return os.path.join(config_dir, newest)


class TfdsRecords:
  """Random access to one split's examples as parsed, undecoded features.

  `records[i]` is the nested dict of tfds' NumPy example parser: scalars,
  arrays and encoded image bytes (`bytes`, or object arrays of bytes for
  sequences). Picklable: the reader is reopened lazily after unpickling.
  """

  def __init__(
      self, builder_dir: str, split: str, *, name: str, configs: tuple[str, ...]
  ):
    """Opens the split and checks the builder's name and config.

    Args:
      builder_dir: the prepared version folder.
      split: 'train', 'val' or 'validation'.
      name: the expected builder name.
      configs: the accepted builder config names.

    Raises:
      ValueError: on a bad split, a builder of another name or config, or a
        dataset not prepared as ArrayRecord (names `dataset_info.json`).
    """
    if split not in _SPLITS:
      raise ValueError(
          f'split must be one of {sorted(_SPLITS)}, got {split!r}.'
      )
    self.builder_dir = builder_dir
    self.split = _SPLITS[split]
    info_path = os.path.join(builder_dir, 'dataset_info.json')
    builder = _tfds().builder_from_directory(builder_dir)
    info = builder.info
    config = info.config_name or ''
    if info.name != name or config not in configs:
      raise ValueError(
          f'{info_path}: expected TFDS dataset {name!r} with config in '
          f'{list(configs)}, got {info.name!r} config {config!r}.'
      )
    if self.split not in info.splits:
      raise ValueError(
          f'{info_path}: no split {self.split!r}; splits: '
          f'{sorted(info.splits)}.'
      )
    formats = [str(getattr(f, 'value', f)) for f in
               info.available_file_formats()]
    if 'array_record' not in formats:
      raise ValueError(
          f'{info_path}: prepared as {formats or "unknown format"}; random '
          "access needs file_format='array_record' (prepare it again with "
          'that format).'
      )
    self.features = info.features
    self.config = config
    self._open(builder)

  def _open(self, builder: Any | None = None) -> None:
    tfds = _tfds()
    if builder is None:
      builder = tfds.builder_from_directory(self.builder_dir)
    # Raw bytes + tfds' NumPy parser rather than tfds' decoding: that would
    # decode all ~100 frames of a DAVIS video to read a 3-frame clip, and it
    # switches to OpenCV's JPEG decoder when cv2 is installed, while the
    # folder sources decode with PIL.
    self._records = builder.as_data_source(
        self.split,
        deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        file_format='array_record',
    )
    self._parser = tfds.core.example_parser.ExampleParserNp(
        builder.info.features.get_serialized_info()
    )
    self._len = len(self._records)

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state['_records'] = state['_parser'] = None
    return state

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._records is None:
      self._open()
    return self._parser.parse_example(self._records[int(index)])

  def where(self, index: int | None = None) -> str:
    """Names the split (and record) in error messages."""
    record = '' if index is None else f' record {index}'
    return f'TFDS {self.builder_dir} split {self.split!r}{record}'


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class CocoPanopticTfdsSource(SkippingSource):
  """tfds `coco/2017_panoptic` reader (grain RandomAccessDataSource).

  Examples are exactly those of `CocoPanopticSource` (image, semantic,
  instance, crowd, image_id, height, width): class = ClassLabel index + 1
  (the ClassLabel follows the panoptic JSON's category order, as do the
  folder source's classes), instances numbered 1..k in `panoptic_objects`
  order (= `segments_info` order), crowd from `is_crowd`. Examples come in
  the record order of the prepared split (tfds' shuffled order; fixed).

  `metadata` has the 133 categories with their COCO ids and isthing from
  `COCO_PANOPTIC_CATEGORIES` (checked against the ClassLabel names);
  `gt_json`, `gt_folder` and `image_folder` are '' (there are no files):
  evaluate PQ with the folder source 'coco_panoptic'.
  """

  def __init__(
      self,
      data_dir: str,
      split: str,
      *,
      max_examples: int | None = None,
      skip_bad_examples: bool = False,
  ):
    """Opens the split (reads metadata only).

    Args:
      data_dir: see the module docstring.
      split: 'train' or 'val'.
      max_examples: keep only the first n records.
      skip_bad_examples: substitute bad examples instead of raising.

    Raises:
      FileNotFoundError: if no prepared dataset is found.
      ValueError: on a bad split or count, another dataset, a non-ArrayRecord
        preparation, or ClassLabel names that are not COCO panoptic's.
    """
    check_count(max_examples, 'max_examples')
    builder_dir = resolve_builder_dir(data_dir, 'coco', '2017_panoptic')
    self._records = TfdsRecords(
        builder_dir, split, name='coco', configs=('2017_panoptic',)
    )
    self.split = 'val' if self._records.split == 'validation' else 'train'
    features = self._records.features
    if 'panoptic_objects' not in features.keys():
      raise ValueError(
          f'{os.path.join(builder_dir, "features.json")}: no '
          "'panoptic_objects' feature (expected coco/2017_panoptic)."
      )
    names = list(features['panoptic_objects']['label'].names)
    expected = [n for _, n in COCO_PANOPTIC_CATEGORIES]
    if names != expected:
      bad = next(
          i for i in range(max(len(names), len(expected)))
          if names[i:i + 1] != expected[i:i + 1]
      )
      raise ValueError(
          f'{os.path.join(builder_dir, "features.json")}: '
          f'panoptic_objects/label has {len(names)} names, expected the '
          f'{len(expected)} COCO panoptic categories; first difference at '
          f'index {bad}: {names[bad:bad + 1]} vs {expected[bad:bad + 1]}.'
      )
    self.metadata = metadata_from_categories([
        {'id': i, 'name': n, 'isthing': int(i <= MAX_THING_ID)}
        for i, n in COCO_PANOPTIC_CATEGORIES
    ])
    n = len(self._records)
    self._len = n if max_examples is None else min(n, max_examples)
    self._init_skipping(skip_bad_examples)

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return (
        f'CocoPanopticTfdsSource(split={self.split!r}, '
        f'num_examples={len(self)}, num_classes={self.metadata.num_classes})'
    )

  def _where(self) -> str:
    return self._records.where()

  def _read(self, index: int) -> dict[str, np.ndarray]:
    ex = self._records[index]
    where = (
        f'{self._records.where(index)} '
        f'({_text(ex["image/filename"])})'
    )
    try:
      image = coco_format.read_rgb_image(
          io.BytesIO(ex['image']), f"'image' of {where}"
      )
      ids = coco_format.read_panoptic_png(
          io.BytesIO(ex['panoptic_image']), f"'panoptic_image' of {where}"
      )
    except ValueError as e:
      raise BadExampleError(str(e)) from e
    if image.shape[:2] != ids.shape:
      raise BadExampleError(
          f'{where}: image has size {image.shape[:2]} but panoptic_image has '
          f'size {ids.shape}.'
      )
    objects = ex['panoptic_objects']
    classes = np.asarray(objects['label'], np.int32).reshape(-1) + 1
    if classes.size and classes.max() >= self.metadata.num_classes:
      raise BadExampleError(
          f'{where}: label {classes.max() - 1} out of range of the '
          f'{self.metadata.num_classes - 1} categories.'
      )
    maps, unknown = segments_to_maps(
        ids,
        np.asarray(objects['id'], np.int64).reshape(-1),
        classes,
        self.metadata.is_thing[classes],
        np.asarray(objects['is_crowd'], np.bool_).reshape(-1),
    )
    if unknown.size:
      raise BadExampleError(
          f'{where}: panoptic_image contains segment id(s) '
          f'{unknown.tolist()} absent from panoptic_objects/id.'
      )
    return {
        'image': image,
        **maps,
        'image_id': np.asarray(int(ex['image/id']), np.int64),
        'height': np.asarray(image.shape[0], np.int32),
        'width': np.asarray(image.shape[1], np.int32),
    }


class DavisTfdsSource(ClipSource):
  """tfds `davis` reader as clips (grain RandomAccessDataSource protocol).

  Examples and sequence access are those of `davis.DavisSource` (see
  `ClipSource`). tfds' `davis` holds the semi-supervised `Annotations/` (not
  `Annotations_unsupervised/`), so `task` is 'semi-supervised'. TFDS keeps
  no ImageSets order: sequences are sorted by name, which is the order of
  the official ImageSets files. Frame names are '00000', '00001', ... as
  tfds' builder reads them.

  Construction reads every record once to index names and frame counts
  (parsing, no image decoding). A record whose frame and segmentation counts
  disagree with `metadata/num_frames` raises BadExampleError, or is left out
  with a warning (listed in `skipped_sequences`) with skip_bad_examples.
  Each clip read parses its sequence's record and decodes only its frames.
  """

  task = 'semi-supervised'

  def __init__(
      self,
      data_dir: str,
      split: str,
      *,
      config: str = '480p',
      clip_length: int = 1,
      max_sequences: int | None = None,
      max_examples: int | None = None,
      skip_bad_examples: bool = False,
  ):
    """Indexes the split.

    Args:
      data_dir: see the module docstring.
      split: 'train' or 'val'.
      config: the builder config looked up under a TFDS data dir: '480p' or
        'full_resolution'.
      clip_length: frames per example (>= 1).
      max_sequences: keep only the first n sequences (name order).
      max_examples: keep only the first n clips.
      skip_bad_examples: leave out bad records and skip bad clips instead of
        raising.

    Raises:
      FileNotFoundError: if no prepared dataset is found.
      ValueError: on a bad split, count or clip_length, another dataset, a
        non-ArrayRecord preparation or a video name used twice.
      BadExampleError: (unless skipped) for a record with inconsistent frame
        counts.
    """
    check_count(max_sequences, 'max_sequences')
    builder_dir = resolve_builder_dir(data_dir, 'davis', config)
    self._records = TfdsRecords(
        builder_dir, split, name='davis', configs=('480p', 'full_resolution')
    )
    self.split = 'val' if self._records.split == 'validation' else 'train'
    self.config = self._records.config
    self.metadata = davis_metadata()
    self.skipped_sequences: list[str] = []
    found: dict[str, tuple[int, int]] = {}
    for r in range(len(self._records)):
      ex = self._records[r]
      name = _text(ex['metadata']['video_name'])
      if name in found:
        raise ValueError(
            f'{self._records.where(r)}: video_name {name!r} also names '
            f'record {found[name][0]}.'
        )
      try:
        found[name] = (r, self._check_record(ex, r, name))
      except BadExampleError as e:
        if not skip_bad_examples:
          raise
        self.skipped_sequences.append(name)
        logging.warning('Skipping DAVIS TFDS video %r: %s', name, e)
    names = sorted(found)
    if max_sequences is not None:
      names = names[:max_sequences]
    self._record_of = [found[n][0] for n in names]
    self._init_clips(
        names,
        [[f'{t:05d}' for t in range(found[n][1])] for n in names],
        clip_length=clip_length,
        max_examples=max_examples,
        skip_bad_examples=skip_bad_examples,
    )

  def _check_record(self, ex: dict[str, Any], index: int, name: str) -> int:
    num_frames = int(ex['metadata']['num_frames'])
    counts = (len(ex['video']['frames']), len(ex['video']['segmentations']))
    if num_frames < 1 or counts != (num_frames, num_frames):
      raise BadExampleError(
          f'{self._records.where(index)} (video {name!r}): '
          f'metadata/num_frames={num_frames} but {counts[0]} frames and '
          f'{counts[1]} segmentations.'
      )
    return num_frames

  def __repr__(self) -> str:
    return (
        f'DavisTfdsSource(split={self.split!r}, config={self.config!r}, '
        f'clip_length={self.clip_length}, num_sequences={len(self._names)}, '
        f'num_clips={len(self)})'
    )

  def _where(self) -> str:
    return self._records.where()

  def _load_frames(
      self, seq_index: int, frame_indices: list[int]
  ) -> list[Frame]:
    record = self._record_of[seq_index]
    video = self._records[record]['video']
    where = (
        f'{self._records.where(record)} (video '
        f'{self._names[seq_index]!r})'
    )
    frames = []
    for t in frame_indices:
      image_name = f'video/frames[{t}] of {where}'
      label_name = f'video/segmentations[{t}] of {where}'
      try:
        image = coco_format.read_rgb_image(
            io.BytesIO(video['frames'][t]), image_name
        )
        ids = davis_format.read_palette_png(
            io.BytesIO(video['segmentations'][t]), label_name
        )
      except ValueError as e:
        raise BadExampleError(str(e)) from e
      frames.append((image, ids, image_name, label_name))
    return frames


@register_source('coco_panoptic_tfds')
def _coco_panoptic_tfds(
    *,
    data_dir: str,
    split: str,
    max_examples: int | None = None,
    skip_bad_examples: bool = False,
) -> CocoPanopticTfdsSource:
  """tfds coco/2017_panoptic read from `data_dir` (see the class)."""
  return CocoPanopticTfdsSource(
      data_dir, split, max_examples=max_examples,
      skip_bad_examples=skip_bad_examples,
  )


@register_source('davis_tfds')
def _davis_tfds(
    *,
    data_dir: str,
    split: str,
    config: str = '480p',
    clip_length: int = 1,
    max_sequences: int | None = None,
    max_examples: int | None = None,
    skip_bad_examples: bool = False,
) -> DavisTfdsSource:
  """tfds davis read from `data_dir` (see DavisTfdsSource)."""
  return DavisTfdsSource(
      data_dir, split, config=config, clip_length=clip_length,
      max_sequences=max_sequences, max_examples=max_examples,
      skip_bad_examples=skip_bad_examples,
  )
