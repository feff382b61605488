"""Tests of the input-pipeline throughput CLI and its COCO-like fixture."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from pix2seq_d_jax.data import (
    coco_panoptic,
    panoptic_format,
    preprocess,
    throughput,
)

_TINY_PREPROCESS = dict(
    image_size=64, mask_size=16, max_instances=101, scale_range=(0.5, 2.0),
    flip=True, color_jitter=1.0, loss_weight_power=0.2,
)


def _parse(argv):
  fv = flags.FlagValues()
  cli = throughput.define_flags(fv)
  return fv(argv), cli


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """One CLI run at tiny size; returns (results JSON, data_dir, stdout)."""
  tmp = tmp_path_factory.mktemp('throughput')
  out = tmp / 'results.json'
  argv, cli = _parse([
      'throughput', f'--data_dir={tmp / "data"}', '--num_images=4',
      '--fixture_size=64,48', '--image_size=64', '--mask_size=16',
      '--batch_size=2', '--batches=2', '--num_workers=0', '--op_examples=2',
      '--op_repeats=2', f'--output={out}',
  ])
  returned = throughput.main(argv, cli)
  with open(out) as f:
    results = json.load(f)
  return results, returned, str(tmp / 'data')


def test_cli_loader_numbers_are_consistent(tiny_run, capsys):
  results, returned, _ = tiny_run
  assert results == json.loads(json.dumps(returned))
  (run,) = results['loader']
  assert run['num_workers'] == 0
  assert run['warmup_batches'] == 1  # 1 + 0 workers * (buffer + 1)
  assert run['examples'] == 2 * 2  # batches x batch_size
  assert len(run['batch_times_s']) == 2
  assert run['total_s'] > 0 and run['first_batch_s'] > 0
  np.testing.assert_allclose(sum(run['batch_times_s']), run['total_s'])
  assert run['examples_per_s'] == run['examples'] / run['total_s']
  np.testing.assert_allclose(run['ms_per_batch'], 1e3 * run['total_s'] / 2)
  np.testing.assert_allclose(
      run['median_ms_per_batch'], 1e3 * np.median(run['batch_times_s'])
  )
  # Batch of 2: image f32 [64, 64, 3]; semantic, instance i32 and
  # loss_weight f32 [16, 16]; image_id i32 []; orig_size, valid_size i32 [2].
  nbytes = 2 * (64 * 64 * 3 * 4 + 3 * 16 * 16 * 4 + 4 + 2 * 2 * 4)
  assert run['mb_per_batch'] == nbytes / 1e6


def test_cli_op_breakdown_is_complete(tiny_run):
  ops = tiny_run[0]['ops']
  assert (ops['examples'], ops['repeats']) == (2, 2)
  assert list(ops['ops']) == list(throughput.OPS)
  for name, o in ops['ops'].items():
    assert o['mean_ms'] > 0 and o['median_ms'] > 0, name
    assert o['cpu_mean_ms'] >= 0, name
  for key, total in (('mean_ms', 'sum_mean_ms'),
                     ('cpu_mean_ms', 'sum_cpu_mean_ms')):
    np.testing.assert_allclose(
        ops[total], sum(o[key] for o in ops['ops'].values())
    )
  # Decoding, id mapping and jitter take measurable CPU time.
  assert ops['sum_cpu_mean_ms'] > 0
  assert ops['read_example_mean_ms'] > 0
  assert ops['preprocess_train_mean_ms'] > 0


def test_cli_fixture_is_a_valid_layout(tiny_run):
  results, _, data_dir = tiny_run
  setup = results['setup']
  root = setup['fixture_root']
  assert os.path.dirname(root) == data_dir
  assert setup['fixture']['num_images'] == 4
  assert setup['fixture']['num_categories'] == 133
  assert (setup['image_size'], setup['mask_size']) == (64, 64 // 4)
  assert setup['scale_range'] == [0.1, 2.0]
  assert len(setup['load_average']) == 2
  source = coco_panoptic.CocoPanopticSource(root, 'train')
  assert len(source) == 4
  assert source.metadata.num_classes == 134
  assert int(source.metadata.is_thing.sum()) == 80
  for i in range(4):
    ex = source[i]  # raises if a PNG id is missing from segments_info
    assert ex['image'].shape == ((48, 64, 3) if i % 2 == 0 else (64, 48, 3))
    assert ex['semantic'].shape == ex['image'].shape[:2]
    assert ex['instance'].max() >= 1 and ex['crowd'].any()


def test_cli_prints_both_tables(tiny_run, tmp_path, capsys):
  # A second run on the same data_dir reuses the fixture.
  root = tiny_run[0]['setup']['fixture_root']
  mtime = os.path.getmtime(os.path.join(root, 'params.json'))
  argv, cli = _parse([
      'throughput', f'--data_dir={tiny_run[2]}', '--num_images=4',
      '--fixture_size=64,48', '--image_size=64', '--mask_size=16',
      '--batch_size=2', '--batches=1', '--num_workers=0', '--op_examples=1',
      '--op_repeats=1',
  ])
  results = throughput.main(argv, cli)
  assert results['setup']['fixture_root'] == root
  assert os.path.getmtime(os.path.join(root, 'params.json')) == mtime
  out = capsys.readouterr().out
  assert 'examples/s' in out and 'ms/batch' in out and 'MB/batch' in out
  for name in throughput.OPS:
    assert name in out


@pytest.mark.parametrize(
    'arg, flag',
    [('--fixture_size=64', 'fixture_size'),
     ('--scale_range=2.0,0.5', 'scale_range'),
     ('--num_workers=x', 'num_workers'),
     ('--mask_size=24', 'image_size')],
)
def test_cli_bad_flags_exit_with_one_line(tmp_path, capsys, arg, flag):
  argv, cli = _parse([
      'throughput', f'--data_dir={tmp_path}', '--num_images=2',
      '--fixture_size=32,24', '--image_size=32', '--mask_size=8',
      '--batch_size=1', arg,
  ])
  with pytest.raises(SystemExit) as e:
    throughput.main(argv, cli)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f'--{flag}' in err


def test_categories_follow_coco_layout():
  cats = throughput.coco_like_categories()
  ids = [c['id'] for c in cats]
  assert len(cats) == 133 and len(set(ids)) == 133
  things = [c['id'] for c in cats if c['isthing']]
  stuff = [c['id'] for c in cats if not c['isthing']]
  assert len(things) == 80 and len(stuff) == 53
  assert max(things) == 90 and 12 not in things and min(stuff) == 92


def test_fixture_segments_match_the_png(tmp_path):
  root = str(tmp_path / 'fx')
  throughput.write_fixture(
      root, num_images=3, long_side=96, short_side=72, seed=3
  )
  content = panoptic_format.load_panoptic_json(
      os.path.join(root, 'annotations', 'panoptic_train2017.json')
  )
  is_thing = {c['id']: c['isthing'] for c in content['categories']}
  for ann in content['annotations']:
    ids = panoptic_format.read_panoptic_png(
        os.path.join(root, 'annotations', 'panoptic_train2017',
                     ann['file_name'])
    )
    segs = ann['segments_info']
    assert 8 <= len(segs) <= 20  # 11-20 drawn, a few may be hidden
    assert sum(s['iscrowd'] for s in segs) == 1
    kinds = {is_thing[s['category_id']] for s in segs if not s['iscrowd']}
    assert kinds == {0, 1}  # stuff and things
    assert (ids == 0).any()  # void on boundaries
    # The PNG holds exactly the listed ids (and void); areas and boxes are
    # those of the pixels.
    assert set(np.unique(ids)) - {0} == {s['id'] for s in segs}
    for s in segs:
      ys, xs = np.nonzero(ids == s['id'])
      assert s['area'] == len(ys)
      assert s['bbox'] == [
          xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
      ]
  with pytest.raises(FileExistsError, match='fx'):
    throughput.write_fixture(
        root, num_images=1, long_side=96, short_side=72, seed=3
    )


def test_ensure_fixture_keys_by_parameters(tmp_path):
  a = throughput.ensure_fixture(
      str(tmp_path), num_images=1, long_side=40, short_side=30
  )
  b = throughput.ensure_fixture(
      str(tmp_path), num_images=1, long_side=40, short_side=30
  )
  c = throughput.ensure_fixture(
      str(tmp_path), num_images=1, long_side=40, short_side=32
  )
  assert a == b != c
  with open(os.path.join(c, 'params.json')) as f:
    assert json.load(f)['short_side'] == 32


def test_op_chain_equals_source_and_preprocess_train(tmp_path):
  root = throughput.ensure_fixture(
      str(tmp_path), num_images=3, long_side=64, short_side=48, seed=1
  )
  source = coco_panoptic.CocoPanopticSource(root, 'train')
  meta = source.metadata
  content = panoptic_format.load_panoptic_json(meta.gt_json)
  fn = throughput.train_preprocess_fn(**_TINY_PREPROCESS)
  for i, (im, ann) in enumerate(
      zip(content['images'], content['annotations'], strict=True)
  ):
    for draw in range(3):
      times, out = throughput.run_ops(
          os.path.join(meta.image_folder, im['file_name']),
          os.path.join(meta.gt_folder, ann['file_name']),
          throughput._segment_arrays(ann, meta),
          np.random.default_rng([i, draw]),
          **_TINY_PREPROCESS,
      )
      ref = fn(source[i], np.random.default_rng([i, draw]))
      assert set(times) == set(throughput.OPS)
      for key, value in out.items():
        np.testing.assert_array_equal(value, ref[key])
        assert value.dtype == ref[key].dtype


def test_preprocess_fn_matches_train_py():
  from configs import coco
  from pix2seq_d_jax import train

  config = coco.get_config('stage=low_res')
  inp = config.input
  ours = throughput.train_preprocess_fn(
      image_size=inp.image_size, mask_size=inp.mask_size,
      max_instances=inp.max_instances, scale_range=tuple(inp.scale_range),
      flip=inp.flip, color_jitter=inp.color_jitter,
      loss_weight_power=config.diffusion.loss_weight_power,
  )
  theirs = train.train_preprocess_fn(config)
  assert ours.func is theirs.func is preprocess.preprocess_train
  assert ours.keywords == theirs.keywords


@pytest.mark.slow
def test_module_entry_point_with_a_worker_process(tmp_path):
  # The real `python -m` entry point: absl parses the flags, so a grain
  # worker process can start; the exit status is 0 (app.run would turn a
  # returned results dict into status 1).
  out = tmp_path / 'r.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'pix2seq_d_jax.data.throughput',
       f'--data_dir={tmp_path}', '--num_images=4', '--fixture_size=64,48',
       '--image_size=64', '--mask_size=16', '--batch_size=2', '--batches=2',
       '--num_workers=0,1', '--op_examples=1', '--op_repeats=1',
       f'--output={out}'],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    loader = json.load(f)['loader']
  assert [r['num_workers'] for r in loader] == [0, 1]
  assert [r['warmup_batches'] for r in loader] == [1, 4]
  for r in loader:
    assert r['examples'] == 4
    assert r['examples_per_s'] == 4 / r['total_s'] > 0
  rows = [line.split() for line in proc.stdout.splitlines()]
  assert [r[0] for r in rows if len(r) == 5 and r[0].isdigit()] == ['0', '1']
