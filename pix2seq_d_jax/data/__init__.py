"""Data sources, preprocessing and grain pipelines; sources picked by name.

`get_source(name, **kwargs)` builds a random-access source from the registry
`SOURCES`: 'coco_panoptic' reads the COCO 2017 panoptic layout under
`data_dir`; 'synthetic' first generates (once, cached under `data_dir` by a
hash of its parameters) a procedural dataset in that same layout and then
reads it with the same reader. New sources register with `@register_source`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pix2seq_d_jax.data import synthetic
from pix2seq_d_jax.data.coco_panoptic import CocoPanopticSource
from pix2seq_d_jax.data.source_api import BadExampleError, PanopticMetadata

__all__ = [
    'SOURCES',
    'BadExampleError',
    'CocoPanopticSource',
    'PanopticMetadata',
    'get_source',
    'register_source',
]

SOURCES: dict[str, Callable[..., Any]] = {}


def register_source(name: str) -> Callable[[Callable], Callable]:
  """Decorator registering a source factory under `name`.

  Raises:
    ValueError: if the name is already registered.
  """

  def wrap(factory: Callable) -> Callable:
    if name in SOURCES:
      raise ValueError(f'Data source {name!r} is already registered.')
    SOURCES[name] = factory
    return factory

  return wrap


def get_source(name: str, **kwargs: Any) -> Any:
  """Builds the registered source `name` with keyword arguments.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones).
  """
  if name not in SOURCES:
    raise ValueError(
        f'Unknown data source {name!r}; registered: {sorted(SOURCES)}.'
    )
  return SOURCES[name](**kwargs)


@register_source('coco_panoptic')
def _coco_panoptic(
    *,
    data_dir: str,
    split: str,
    max_examples: int | None = None,
    skip_bad_examples: bool = False,
) -> CocoPanopticSource:
  """COCO 2017 panoptic read from `data_dir` (see CocoPanopticSource)."""
  return CocoPanopticSource(
      data_dir,
      split,
      max_examples=max_examples,
      skip_bad_examples=skip_bad_examples,
  )


@register_source('synthetic')
def _synthetic(
    *,
    data_dir: str,
    split: str,
    max_examples: int | None = None,
    skip_bad_examples: bool = False,
    **generator_params: Any,
) -> CocoPanopticSource:
  """Synthetic shapes dataset cached under `data_dir`.

  `generator_params` are those of `synthetic.generate` (num_train, num_val,
  image_size, seed); the dataset is generated on first use.
  """
  root = synthetic.ensure_synthetic(data_dir, **generator_params)
  return CocoPanopticSource(
      root,
      split,
      max_examples=max_examples,
      skip_bad_examples=skip_bad_examples,
  )
# Sources that register themselves import the registry above, so they come
# last.
from pix2seq_d_jax.data import (  # noqa: E402, F401
  cityscapes_panoptic,
  davis,
  kitti_step,
  synthetic_video,
  tfds_sources,
)
