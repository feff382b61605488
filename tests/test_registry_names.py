"""Every registry name a shipped config uses resolves, without building.

Configs select the data source, the model, each evaluator (`type`), the
loss, the noise schedule, the sampler and the bit code by name. A misspelt
name would otherwise surface only when that piece is built, possibly hours
into a run (an evaluator is built at the first eval). Here each name is
looked up in its registry (the dicts the `register` decorators fill and the
diffusion modules' name tuples); nothing is built and no data is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection

import pytest

from pix2seq_d_jax import data, evaluators, models
from pix2seq_d_jax.diffusion import analog_bits, losses, sampler, schedules

# Every config and variant the tests, README and launch scripts use.
SHIPPED = (
    'synthetic',
    'synthetic:tiny',
    'synthetic:long',
    'synthetic:video',
    'synthetic:video,tiny',
    'coco',
    'coco:stage=low_res',
    'coco:stage=high_res',
    'cityscapes',
    'davis',
    'kitti_step',
)


def _load(spec: str):
  name, _, arg = spec.partition(':')
  module = importlib.import_module(f'configs.{name}')
  return module.get_config(arg or None)


def _lookup(field: str, value: str, known: Collection[str]) -> None:
  if value not in known:
    raise ValueError(
        f'config.{field}={value!r} is not registered; known: '
        f'{sorted(known)}'
    )


def resolve_names(config) -> dict[str, object]:
  """Looks up every registry name in `config`; returns field -> entry.

  Raises:
    ValueError: for the first unknown name; the message names the field,
      the value and the known names.
  """
  resolved = {}
  _lookup('input.source', config.input.source, data.SOURCES)
  resolved['input.source'] = data.SOURCES[config.input.source]
  _lookup('model.name', config.model.name, models.MODELS)
  resolved['model.name'] = models.MODELS[config.model.name]
  for field, known in (
      ('loss_type', losses.LOSS_TYPES),
      ('schedule', schedules.SCHEDULES),
      ('sampler', sampler.SAMPLERS),
      ('bit_code', analog_bits.BIT_CODES),
  ):
    _lookup(f'diffusion.{field}', config.diffusion[field], known)
    resolved[f'diffusion.{field}'] = config.diffusion[field]
  for name, ev in config.evals.items():
    try:
      # The trainer's own lookup (its error lists the known types).
      resolved[f'evals.{name}.type'] = evaluators.get_evaluator_class(ev.type)
    except ValueError as e:
      raise ValueError(f'config.evals.{name}.type: {e}') from e
  return resolved


@pytest.mark.parametrize('spec', SHIPPED)
def test_shipped_config_names_resolve(spec):
  config = _load(spec)
  resolved = resolve_names(config)
  assert resolved['model.name'].__name__ == 'Pix2SeqD'
  assert callable(resolved['input.source'])
  # Every eval entry resolved to a class of the evaluator base.
  for name in config.evals:
    assert issubclass(resolved[f'evals.{name}.type'], evaluators.base.Evaluator)


def test_video_configs_pick_the_video_pieces():
  # Names that must differ between the image and video variants.
  video = resolve_names(_load('synthetic:video'))
  image = resolve_names(_load('synthetic'))
  assert image['input.source'] is data.SOURCES['synthetic']
  assert video['input.source'] is data.SOURCES['synthetic_video']
  assert {c.__name__ for k, c in video.items() if k.startswith('evals.')} == {
      'DavisVideoEvaluator'
  }


@pytest.mark.parametrize(
    ('field', 'typo', 'known'),
    [
        ('evals.panoptic.type', 'coco_panoptc', 'coco_panoptic'),
        ('input.source', 'cocopanoptic', 'synthetic_video'),
        ('model.name', 'pix2seqd', 'pix2seq_d'),
        ('diffusion.schedule', 'cosin', 'sigmoid'),
    ],
)
def test_a_misspelt_name_fails_listing_the_known_ones(field, typo, known):
  config = _load('synthetic')
  section, _, key = field.rpartition('.')
  node = config
  for part in section.split('.'):
    node = node[part]
  node[key] = typo
  with pytest.raises(ValueError, match=repr(typo)) as e:
    resolve_names(config)
  assert repr(known) in str(e.value), str(e.value)
