"""Tests of the input benchmark and its COCO-layout synthetic fixture."""

import ast
import inspect
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from absl import flags

from configs import coco
from pix2seq_d_jax import data as data_lib
from pix2seq_d_jax import experiment, input_benchmark
from pix2seq_d_jax.data import coco_panoptic, preprocess, synthetic

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = os.path.join(_REPO, 'configs', 'coco.py')
_TINY = ['--config.input.image_size=64', '--config.input.mask_size=16']


def _tiny_config():
  config = coco.get_config()
  config.input.image_size, config.input.mask_size = 64, 16
  return config


def _source(root):
  return data_lib.get_source('coco_panoptic', data_dir=root, split='train')


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return input_benchmark.ensure_fixture(
      str(tmp_path_factory.mktemp('fx')), num_images=3, height=24, width=40,
      seed=1,
  )


# --------------------------------------------------------------- fixture


def test_fixture_round_trips_through_the_source(root):
  with open(os.path.join(root, 'annotations',
                         'panoptic_train2017.json')) as f:
    content = json.load(f)
  source = _source(root)
  meta = source.metadata
  assert len(source) == 3
  np.testing.assert_array_equal(source.image_ids(), [1, 2, 3])
  assert [im['file_name'] for im in content['images']] == [
      f'{i:012d}.jpg' for i in (1, 2, 3)]
  to_class = meta.category_id_to_class
  for i, ann in enumerate(content['annotations']):
    ex = source[i]
    assert int(ex['image_id']) == ann['image_id'] == i + 1
    assert ex['image'].shape == (24, 40, 3)
    segs = ann['segments_info']
    # No void: the segments tile the image.
    assert sum(s['area'] for s in segs) == 24 * 40
    assert not ex['crowd'].any()
    things = [s for s in segs if meta.is_thing[to_class[s['category_id']]]]
    # Instances are numbered 1..k in segments_info order, with their areas
    # and classes as written.
    assert int(ex['instance'].max()) == len(things)
    for k, s in enumerate(things, start=1):
      mask = ex['instance'] == k
      assert int(mask.sum()) == s['area']
      assert set(np.unique(ex['semantic'][mask])) == {
          to_class[s['category_id']]}
    for s in segs:
      cls = to_class[s['category_id']]
      if not meta.is_thing[cls]:  # one stuff segment per class
        assert int((ex['semantic'] == cls).sum()) == s['area']


def test_fixture_is_the_renderer_scene_cropped(tmp_path):
  # A square fixture holds generate()'s train scenes, a wide one their
  # top-left crop: the same renderer, not a copy of it.
  synthetic.generate(str(tmp_path / 'gen'), num_train=2, num_val=1,
                     image_size=32, seed=5)
  synthetic.write_coco_layout(str(tmp_path / 'sq'), num_images=2, height=32,
                              width=32, seed=5)
  synthetic.write_coco_layout(str(tmp_path / 'crop'), num_images=2,
                              height=20, width=32, seed=5)
  gen, sq, crop = (_source(str(tmp_path / n)) for n in ('gen', 'sq', 'crop'))
  for i in range(2):
    for key in ('semantic', 'instance'):
      np.testing.assert_array_equal(sq[i][key], gen[i][key])
    np.testing.assert_array_equal(crop[i]['semantic'],
                                  gen[i]['semantic'][:20])
    # JPEG vs the generator's lossless PNG: close, not equal.
    diff = np.abs(sq[i]['image'].astype(int) - gen[i]['image'].astype(int))
    assert 0 < diff.mean() < 16
  with pytest.raises(FileExistsError):
    synthetic.write_coco_layout(str(tmp_path / 'sq'), num_images=1,
                                height=32, width=32, seed=5)
  with pytest.raises(ValueError, match='height and width'):
    synthetic.write_coco_layout(str(tmp_path / 'x'), num_images=1,
                                height=8, width=32, seed=5)


def test_ensure_fixture_is_keyed_by_its_parameters(root):
  data_dir = os.path.dirname(root)
  mtime = os.path.getmtime(os.path.join(root, 'params.json'))
  again = input_benchmark.ensure_fixture(
      data_dir, num_images=3, height=24, width=40, seed=1)
  assert again == root
  assert os.path.getmtime(os.path.join(root, 'params.json')) == mtime
  other = input_benchmark.ensure_fixture(
      data_dir, num_images=3, height=24, width=40, seed=2)
  assert other != root and os.path.isdir(other)


# --------------------------------------------------------------- profile


def _called_functions(fn):
  """{function: call sites} of the package functions `fn`'s body calls."""
  module = inspect.getmodule(fn)
  sites = {}
  for node in ast.walk(ast.parse(inspect.getsource(fn).lstrip())):
    if not isinstance(node, ast.Call):
      continue
    if isinstance(node.func, ast.Name):
      target = getattr(module, node.func.id, None)
    elif (isinstance(node.func, ast.Attribute)
          and isinstance(node.func.value, ast.Name)):
      owner = getattr(module, node.func.value.id, None)
      target = (getattr(owner, node.func.attr, None)
                if isinstance(owner, types.ModuleType) else None)
    else:
      continue
    if (isinstance(target, types.FunctionType)
        and target.__module__.startswith('pix2seq_d_jax.')):
      sites[target] = sites.get(target, 0) + 1
  return sites


def _op(fn):
  return f"{fn.__module__.removeprefix('pix2seq_d_jax.')}.{fn.__name__}"


def test_profile_names_the_real_chain_and_shares_sum_to_one(root):
  preprocess_fn = experiment.train_preprocess_fn(_tiny_config())
  assert preprocess_fn.func is preprocess.preprocess_train
  prof = input_benchmark.profile_preprocessing(
      _source(root), preprocess_fn, num_examples=4, seed=0)
  rows = {r['op']: r for r in prof['ops']}
  train_calls = _called_functions(preprocess.preprocess_train)
  read_calls = _called_functions(coco_panoptic.CocoPanopticSource._read)
  # The chain as the code is today, found without running it.
  assert {_op(f) for f in train_calls} >= {
      'data.preprocess.large_scale_jitter', 'data.preprocess.color_jitter',
      'data.preprocess.resize_labels', 'data.preprocess.loss_weights'}
  assert 'data.coco_panoptic.segments_to_maps' in {_op(f) for f in read_calls}
  # Every function the real chain calls is a row, with its call count
  # (each call site runs once per example with flip on).
  for fn, sites in {**train_calls, **read_calls}.items():
    assert rows[_op(fn)]['calls'] == sites, _op(fn)
  assert 'data.preprocess.preprocess_train (self)' in rows
  assert 'data.coco_panoptic._read (self)' in rows
  # COCO's 'random' stuff ids: the crowd map is resized too.
  assert rows['data.preprocess.resize_labels']['calls'] == 4
  assert rows['data.preprocess.number_stuff_segments']['calls'] == 1
  shares = [r['share'] for r in prof['ops']]
  assert all(0 <= s <= 1 for s in shares)
  assert sum(shares) == pytest.approx(1.0, abs=1e-9)
  assert sum(shares) <= 1 + 1e-9
  assert sum(r['ms'] for r in prof['ops']) == pytest.approx(prof['total_ms'])
  assert prof['total_ms'] > 0 and prof['examples'] == 4
  assert [r['ms'] for r in prof['ops']] == sorted(
      (r['ms'] for r in prof['ops']), reverse=True)


# ------------------------------------------------------------------- CLI


def _parse(argv):
  argv = ['input_benchmark', f'--config={_CONFIG}', *argv]
  fv = flags.FlagValues()
  cli = input_benchmark.define_flags(fv, argv)
  return fv(argv), cli


@pytest.mark.parametrize(
    'arg, named',
    [('--fixture_size=64', '--fixture_size'),
     ('--fixture_size=64,8', '--fixture_size'),
     ('--num_workers=x', '--num_workers'),
     ('--num_workers=-1', '--num_workers'),
     ('--batch_size=5', '--batch_size'),
     ('--batches=0', '--batches'),
     ('--profile_examples=0', '--profile_examples'),
     ('--config.input.mask_size=24', 'input.mask_size')],
)
def test_bad_values_exit_with_one_error_line(tmp_path, capsys, arg, named):
  argv, cli = _parse([f'--data_dir={tmp_path}', '--num_images=4',
                      '--batch_size=2', *_TINY, arg])
  with pytest.raises(SystemExit) as e:
    input_benchmark.main(argv, cli)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert err.startswith('error: ') and named in err
  assert os.listdir(tmp_path) == []  # checked before writing the fixture


def test_module_entry_point_prints_both_tables(tmp_path):
  out = tmp_path / 'r.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'pix2seq_d_jax.input_benchmark',
       '--config=configs/coco.py', *_TINY, f'--data_dir={tmp_path}',
       '--num_images=4', '--fixture_size=40,24', '--batch_size=2',
       '--batches=2', '--num_workers=0', '--profile_examples=2',
       f'--output={out}'],
      capture_output=True, text=True, timeout=120, cwd=_REPO,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    results = json.load(f)
  setup = results['setup']
  # The config's own training preprocessing, as training builds it.
  expected = experiment.train_preprocess_fn(_tiny_config()).keywords
  assert setup['preprocess'] == {
      k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
  assert setup['fixture']['num_images'] == 4
  assert setup['fixture_size'] == [40, 24]
  (run,) = results['loader']
  assert (run['num_workers'], run['warmup_batches']) == (0, 1)
  assert run['examples'] == 4 and len(run['batch_times_s']) == 2
  assert run['examples_per_s'] == run['examples'] / run['total_s']
  np.testing.assert_allclose(sum(run['batch_times_s']), run['total_s'])
  # Batch of 2: image f32 [64, 64, 3]; semantic, instance i32 and
  # loss_weight f32 [16, 16]; image_id i32 []; orig_size, valid_size i32 [2].
  nbytes = 2 * (64 * 64 * 3 * 4 + 3 * 16 * 16 * 4 + 4 + 2 * 2 * 4)
  assert run['mb_per_batch'] == nbytes / 1e6
  lines = proc.stdout.splitlines()
  assert any(line.split()[:2] == ['0', f"{run['examples_per_s']:.2f}"]
             for line in lines if line.strip())
  for r in results['profile']['ops']:
    assert any(line.startswith(r['op'] + ' ') for line in lines), r['op']
  assert any(line.startswith('total ') for line in lines)
