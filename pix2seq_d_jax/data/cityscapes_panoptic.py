"""Random-access reader of Cityscapes panoptic (cityscapesScripts layout).

cityscapesScripts' `createPanopticImgs` writes a COCO-panoptic JSON and PNGs
next to the original images:

  <root>/leftImg8bit/{split}/{city}/<base>_leftImg8bit.png
  <root>/gtFine/cityscapes_panoptic_{split}.json
  <root>/gtFine/cityscapes_panoptic_{split}/<base>_gtFine_panoptic.png

where `<base>` is `{city}_{seq}_{frame}` and is also the (string) image id.
The PNG encoding, segments and categories are COCO's, so
`CityscapesPanopticSource` reuses `CocoPanopticSource` for indexing, decoding
and validation. It only differs in the paths and in the ids: the JSON's string
image ids become int ids (the index of the id in sorted order), because the
rest of the framework (preprocessing, evaluators) carries int32 image ids.

The evaluator looks annotations up in `metadata.gt_json` by int image id, so
that path points to a normalised copy of the JSON (int ids, image file names
relative to `metadata.image_folder`, i.e. `{city}/<base>_leftImg8bit.png`),
written once under `cache_dir` (default: the system temp folder) and keyed by
a hash of the original JSON; the dataset folder itself is never written to.

Registered as the data source 'cityscapes_panoptic'. This module imports the
registry from the package, so the package imports it last.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import numpy as np
from etils import epath

from pix2seq_d_jax.data import register_source
from pix2seq_d_jax.data.coco_panoptic import CocoPanopticSource, open_layout
from pix2seq_d_jax.data.source_api import BadExampleError
from pix2seq_d_jax.formats import coco_panoptic as coco_format
from pix2seq_d_jax.formats import paths

_DEFAULT_CACHE_DIR = os.path.join(
    tempfile.gettempdir(), 'pix2seq_d_jax', 'cityscapes_panoptic'
)


def city_of(file_name: str) -> str:
  """Returns the city of a Cityscapes file name (the part before the first _).

  Raises:
    ValueError: if the name has no '_' or starts with it.
  """
  city = os.path.basename(file_name).split('_', 1)[0]
  if '_' not in os.path.basename(file_name) or not city:
    raise ValueError(
        f'Cityscapes file name {file_name!r}: expected '
        '"{city}_{seq}_{frame}_..." with the city before the first "_".'
    )
  return city


def normalize_json(
    content: dict[str, Any], path: str
) -> tuple[dict[str, Any], list[str]]:
  """Converts a Cityscapes panoptic JSON to int image ids and city paths.

  Args:
    content: the parsed JSON (`images`, `annotations`, `categories`), image
      ids of any hashable JSON type (strings in the Cityscapes conversion).
    path: the JSON file, named in errors.

  Returns:
    `(normalised, names)`: a new JSON dict whose image ids are the index of
    the original id in sorted order (as str), whose `images[].file_name` is
    `{city}/{file_name}` and which keeps the original id in
    `images[].image_name`; and the original image id (as str) of each
    annotation, in annotation order.

  Raises:
    ValueError: on duplicate image ids, an annotation whose image_id is not in
      `images`, or an image file name without a city prefix.
  """
  original = [str(im['id']) for im in content['images']]
  if len(set(original)) != len(original):
    dup = sorted({i for i in original if original.count(i) > 1})
    raise ValueError(f'{path}: duplicate image ids {dup[:5]} in images.')
  int_id = {name: i for i, name in enumerate(sorted(original))}
  images = []
  for im in content['images']:
    name = str(im['id'])
    file_name = str(im['file_name'])
    images.append(
        dict(
            im,
            id=int_id[name],
            image_name=name,
            file_name=f'{city_of(file_name)}/{file_name}',
        )
    )
  annotations, names = [], []
  for i, ann in enumerate(content['annotations']):
    name = str(ann['image_id'])
    if name not in int_id:
      raise ValueError(
          f'{path}: annotations[{i}] has image_id {name!r}, which is not in '
          'images.'
      )
    annotations.append(dict(ann, image_id=int_id[name]))
    names.append(name)
  normalised = {
      'images': images,
      'annotations': annotations,
      'categories': list(content['categories']),
  }
  return normalised, names


class CityscapesPanopticSource(CocoPanopticSource):
  """Cityscapes panoptic reader (grain RandomAccessDataSource protocol).

  Examples are those of `CocoPanopticSource` (image, semantic, instance,
  crowd, image_id, height, width) plus `image_name`: a 0-d numpy str array,
  the original Cityscapes id `{city}_{seq}_{frame}`. `image_id` is the index
  of that name among the split's sorted image names. Void (ignored Cityscapes
  labels) is id 0 in the PNGs and class 0 here; the classes are the JSON's
  categories in JSON order (19 plus void for the standard conversion).
  """

  def __init__(
      self,
      root: str,
      split: str,
      *,
      max_examples: int | None = None,
      skip_bad_examples: bool = False,
      cache_dir: str | None = None,
  ):
    """Indexes the split and writes the normalised JSON if not cached.

    Args:
      root: Cityscapes root holding `leftImg8bit/` and `gtFine/`.
      split: 'train' or 'val'.
      max_examples: keep only the first n annotations (JSON order).
      skip_bad_examples: substitute bad examples instead of raising.
      cache_dir: folder for the normalised JSON (created if needed); default
        `<system temp>/pix2seq_d_jax/cityscapes_panoptic`.

    Raises:
      ValueError: on a bad split / max_examples or an invalid JSON (see
        `normalize_json`).
      FileNotFoundError: if the root, JSON, PNG folder, image folder or a
        city folder of the image folder is missing.
    """
    # The parent's constructor derives COCO paths, so the state it sets is
    # set here from the Cityscapes paths instead.
    source_json = os.path.join(
        root, 'gtFine', f'cityscapes_panoptic_{split}.json'
    )
    gt_folder = os.path.join(root, 'gtFine', f'cityscapes_panoptic_{split}')
    image_folder = os.path.join(root, 'leftImg8bit', split)
    content = open_layout(
        root, 'Cityscapes root', split, max_examples,
        gt_json=source_json, gt_folder=gt_folder, image_folder=image_folder,
    )
    normalised, names = normalize_json(content, source_json)
    # A missing city is a setup error, so it fails here, not per example.
    for city in sorted({city_of(im['file_name']) for im in content['images']}):
      city_folder = os.path.join(image_folder, city)
      if not paths.isdir(city_folder):
        raise FileNotFoundError(
            f'image folder of city {city!r} not found: {city_folder} '
            f'(the city of images in {source_json}).'
        )
    gt_json = _write_cached_json(
        normalised, source_json, split, cache_dir or _DEFAULT_CACHE_DIR
    )

    self.source_json = source_json
    self._init_state(
        normalised, gt_json=gt_json, gt_folder=gt_folder,
        image_folder=image_folder, split=split, max_examples=max_examples,
        skip_bad_examples=skip_bad_examples,
    )
    self._names = names[: len(self._records)]

  def __repr__(self) -> str:
    return (
        f'CityscapesPanopticSource(split={self.split!r}, '
        f'num_examples={len(self)}, num_classes={self.metadata.num_classes})'
    )

  def image_names(self) -> list[str]:
    """Returns the Cityscapes image names in example order (no file I/O)."""
    return list(self._names)

  def _read(self, index: int) -> dict[str, np.ndarray]:
    try:
      example = super()._read(index)
    except BadExampleError as e:
      # The parent names the normalised JSON; add the dataset's own names.
      raise BadExampleError(
          f'{e} (Cityscapes image {self._names[index]!r} of '
          f'{self.source_json})'
      ) from e
    example['image_name'] = np.asarray(self._names[index])
    return example


def _write_cached_json(
    normalised: dict[str, Any], source_json: str, split: str, cache_dir: str
) -> str:
  """Writes the normalised JSON once, keyed by the source JSON's bytes.

  Returns:
    Path of `<cache_dir>/<sha256 prefix>/cityscapes_panoptic_{split}.json`.
  """
  digest = hashlib.sha256(
      epath.Path(source_json).read_bytes()).hexdigest()[:16]
  path = os.path.join(
      cache_dir, digest, f'cityscapes_panoptic_{split}.json'
  )
  if not paths.isfile(path):
    # Atomic write (it creates the folder): concurrent hosts writing the
    # same content cannot leave a truncated file for one another.
    coco_format.write_panoptic_json(
        path,
        normalised['images'],
        normalised['annotations'],
        normalised['categories'],
    )
  return path


@register_source('cityscapes_panoptic')
def _cityscapes_panoptic(
    *,
    data_dir: str,
    split: str,
    max_examples: int | None = None,
    skip_bad_examples: bool = False,
    cache_dir: str | None = None,
) -> CityscapesPanopticSource:
  """Cityscapes panoptic read from `data_dir` (see CityscapesPanopticSource)."""
  return CityscapesPanopticSource(
      data_dir,
      split,
      max_examples=max_examples,
      skip_bad_examples=skip_bad_examples,
      cache_dir=cache_dir,
  )
