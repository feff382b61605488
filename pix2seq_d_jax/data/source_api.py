"""The source API every data source implements, and its metadata.

A source is a grain random-access data source (`__len__`, `__getitem__`)
returning one raw example dict of numpy arrays; `SkippingSource` adds the
shared handling of bad examples on disk (`BadExampleError`, optionally
skipped lazily), and `PanopticMetadata` describes a split's class layout and
files. The COCO, Cityscapes, DAVIS, KITTI-STEP, TFDS and synthetic sources
all build on this module, so none needs another source's reader for it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np
from absl import logging

# Splits of the on-disk layouts (COCO, KITTI-STEP, DAVIS).
SPLITS = ('train', 'val')


class BadExampleError(ValueError):
  """One example on disk is unreadable or inconsistent with its JSON."""


class SkippingSource(abc.ABC):
  """grain random-access source whose examples may be bad on disk.

  Subclasses implement `__len__`, `_read(index)` (raising BadExampleError
  for a bad example) and `_where()` (the dataset, for messages). With
  `skip_bad_examples` examples are validated lazily when read: a bad one is
  replaced by the next good one (cyclically), a warning is logged, and
  `num_skipped` / `bad_indices` record it. Those counters are per process:
  grain worker processes hold their own copy. `read_with_index` also says
  which example was read, so evaluation can drop substitutes.
  """

  skip_bad_examples: bool = False

  def _init_skipping(self, skip_bad_examples: bool) -> None:
    self.skip_bad_examples = skip_bad_examples
    self.num_skipped = 0
    self.bad_indices: set[int] = set()

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of examples."""

  @abc.abstractmethod
  def _read(self, index: int) -> dict[str, np.ndarray]:
    """Reads example `index`; raises BadExampleError for a bad one."""

  @abc.abstractmethod
  def _where(self) -> str:
    """Names the dataset (split file or folder) in messages."""

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Reads example `index` (or its substitute, see the class docstring).

    Raises:
      IndexError: if index is out of range.
      BadExampleError: for a bad example when skip_bad_examples is False, or
        when every example is bad.
    """
    return self.read_with_index(index)[0]

  def read_with_index(self, index: int) -> tuple[dict[str, np.ndarray], int]:
    """Reads example `index`; also returns the index actually read.

    Evaluation needs to know about a substitution: the substitute is a real
    example of its own, so counting it again would score it twice while the
    bad example is silently left out.

    Returns:
      (example, read_index); read_index != index when a bad example was
      replaced by the next good one.

    Raises:
      IndexError, BadExampleError: as `__getitem__`.
    """
    index = int(index)
    n = len(self)
    if not 0 <= index < n:
      raise IndexError(f'index {index} out of range [0, {n}).')
    if not self.skip_bad_examples:
      return self._read(index), index
    for offset in range(n):
      candidate = (index + offset) % n
      if candidate in self.bad_indices:
        self.num_skipped += 1
        continue
      try:
        return self._read(candidate), candidate
      except BadExampleError as e:
        self.bad_indices.add(candidate)
        self.num_skipped += 1
        logging.warning(
            'Skipping bad example %d (%d skipped so far): %s',
            candidate, self.num_skipped, e,
        )
    raise BadExampleError(f'All {n} examples of {self._where()} are bad.')


@dataclasses.dataclass(frozen=True)
class PanopticMetadata:
  """Class layout and file locations of one panoptic split.

  Attributes:
    categories: the JSON's categories, in JSON order.
    class_names: index 0 = 'void', then category names in JSON order.
    class_to_category_id: int32 [num_classes]; [0] = 0 (void).
    is_thing: bool [num_classes]; [0] = False.
    num_classes: len(categories) + 1.
    gt_json: path of the split's panoptic JSON (for the evaluator).
    gt_folder: path of the split's panoptic PNG folder.
    image_folder: path of the split's image folder.
  """

  categories: list[dict[str, Any]]
  class_names: tuple[str, ...]
  class_to_category_id: np.ndarray
  is_thing: np.ndarray
  num_classes: int
  gt_json: str
  gt_folder: str
  image_folder: str

  @property
  def category_id_to_class(self) -> dict[int, int]:
    """Maps a JSON category id to its contiguous class index (>= 1)."""
    return {
        int(c): i for i, c in enumerate(self.class_to_category_id) if i > 0
    }


def metadata_from_categories(
    categories: list[dict[str, Any]],
    *,
    gt_json: str = '',
    gt_folder: str = '',
    image_folder: str = '',
) -> PanopticMetadata:
  """Builds the class layout from a panoptic JSON's category list.

  Args:
    categories: `[{id, name, isthing, ...}]` in JSON order.
    gt_json: path recorded in the metadata.
    gt_folder: path recorded in the metadata.
    image_folder: path recorded in the metadata.

  Returns:
    The metadata; class i >= 1 is `categories[i - 1]`.

  Raises:
    ValueError: on duplicate category ids (names the file `gt_json`).
  """
  ids = [int(c['id']) for c in categories]
  if len(set(ids)) != len(ids):
    raise ValueError(f'{gt_json}: duplicate category ids in {ids}.')
  return PanopticMetadata(
      categories=list(categories),
      class_names=('void',) + tuple(str(c['name']) for c in categories),
      class_to_category_id=np.array([0] + ids, np.int32),
      is_thing=np.array(
          [False] + [bool(c['isthing']) for c in categories], np.bool_
      ),
      num_classes=len(categories) + 1,
      gt_json=gt_json,
      gt_folder=gt_folder,
      image_folder=image_folder,
  )


def check_count(value: int | None, name: str) -> None:
  """Raises ValueError unless value is None or a non-negative int."""
  if value is not None and value < 0:
    raise ValueError(f'{name} must be >= 0 or None, got {value}.')
