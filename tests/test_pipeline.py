"""Tests of the grain train loader and the padded eval batches."""

import functools
import gc

import numpy as np
import pytest
from absl import flags

from pix2seq_d_jax.data import coco_panoptic, pipeline, preprocess, synthetic


class FakeSource:
  """In-memory source; example i has image_id 100 + i."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {
        'image_id': np.int64(100 + i),
        'x': np.full((2, 2), i, np.int32),
    }

  def __repr__(self):
    return f'FakeSource({self.n})'


def train_fn(raw, rng):
  return {
      'image_id': raw['image_id'].astype(np.int32),
      'x': raw['x'],
      'noise': np.float32(rng.uniform()),
  }


def eval_fn(raw):
  return {'image_id': raw['image_id'].astype(np.int32), 'x': raw['x']}


def _take(it, k):
  return [next(it) for _ in range(k)]


def _ids(batches):
  return np.concatenate([b['image_id'] for b in batches])


def test_train_deterministic_per_seed_and_epochs_shuffle():
  src = FakeSource(12)
  a = _take(
      pipeline.make_train_loader(
          src, batch_size=4, seed=5, preprocess_fn=train_fn
      ),
      6,
  )
  b = _take(
      pipeline.make_train_loader(
          src, batch_size=4, seed=5, preprocess_fn=train_fn
      ),
      6,
  )
  for x, y in zip(a, b, strict=True):
    assert x['image_id'].shape == (4,) and x['x'].shape == (4, 2, 2)
    np.testing.assert_array_equal(x['image_id'], y['image_id'])
    np.testing.assert_array_equal(x['noise'], y['noise'])
  ids = _ids(a)
  np.testing.assert_array_equal(np.sort(ids[:12]), np.arange(100, 112))
  np.testing.assert_array_equal(np.sort(ids[12:]), np.arange(100, 112))
  assert not np.array_equal(ids[:12], ids[12:])  # reshuffled per epoch
  # Per-example randomness differs between epochs of the same example.
  noise = np.concatenate([x['noise'] for x in a])
  first = dict(zip(ids[:12], noise[:12], strict=True))
  second = dict(zip(ids[12:], noise[12:], strict=True))
  assert all(first[k] != second[k] for k in first)
  c = _take(
      pipeline.make_train_loader(
          src, batch_size=4, seed=6, preprocess_fn=train_fn
      ),
      3,
  )
  assert not np.array_equal(_ids(c), ids[:12])


def test_train_shards_are_disjoint_and_cover():
  src = FakeSource(20)
  seen = []
  for shard in range(2):
    it = pipeline.make_train_loader(
        src,
        batch_size=2,
        seed=1,
        preprocess_fn=train_fn,
        shard_index=shard,
        shard_count=2,
    )
    seen.append(set(_ids(_take(it, 5)).tolist()))  # one epoch of the shard
  assert len(seen[0]) == len(seen[1]) == 10
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(100, 120))


def test_train_resume_is_exact():
  src = FakeSource(10)
  make = functools.partial(
      pipeline.make_train_loader,
      src,
      batch_size=3,
      seed=2,
      preprocess_fn=train_fn,
  )
  reference = _take(make(), 8)
  it = make()
  _take(it, 3)
  state = it.get_state()
  resumed = make()
  resumed.set_state(state)
  for x, y in zip(_take(resumed, 5), reference[3:], strict=True):
    np.testing.assert_array_equal(x['image_id'], y['image_id'])
    np.testing.assert_array_equal(x['noise'], y['noise'])


def test_train_rejects_too_small_shard():
  with pytest.raises(ValueError, match='cannot fill one batch of 4'):
    pipeline.make_train_loader(
        FakeSource(6),
        batch_size=4,
        seed=0,
        preprocess_fn=train_fn,
        shard_index=0,
        shard_count=2,
    )


@pytest.mark.parametrize(
    'n,batch,shards,max_examples',
    [(11, 3, 2, None), (2, 2, 3, None), (30, 4, 3, 13)],
)
def test_eval_padding_counts_every_example_once(n, batch, shards, max_examples):
  src = FakeSource(n)
  expected = pipeline.num_eval_batches(
      src, batch_size=batch, shard_count=shards, max_examples=max_examples
  )
  real = []
  for shard in range(shards):
    batches = list(
        pipeline.make_eval_batches(
            src,
            batch_size=batch,
            preprocess_fn=eval_fn,
            shard_index=shard,
            shard_count=shards,
            max_examples=max_examples,
        )
    )
    assert len(batches) == expected
    for b in batches:
      assert b['_mask'].shape == (batch,) and b['_mask'].dtype == np.bool_
      assert b['x'].shape == (batch, 2, 2)
      real.extend(b['image_id'][b['_mask']].tolist())
  count = n if max_examples is None else max_examples
  assert sorted(real) == list(range(100, 100 + count))


def test_synthetic_end_to_end(tmp_path):
  root = synthetic.ensure_synthetic(
      str(tmp_path), num_train=8, num_val=3, image_size=32
  )
  src = coco_panoptic.CocoPanopticSource(root, 'train')
  fn = functools.partial(
      preprocess.preprocess_train,
      image_size=32,
      mask_size=16,
      max_instances=8,
      scale_range=(0.8, 1.5),
      flip=True,
      color_jitter_strength=0.3,
      loss_weight_power=0.2,
  )
  batch = next(
      pipeline.make_train_loader(src, batch_size=4, seed=0, preprocess_fn=fn)
  )
  assert batch['image'].shape == (4, 32, 32, 3)
  assert batch['semantic'].shape == batch['loss_weight'].shape == (4, 16, 16)
  assert batch['semantic'].max() < src.metadata.num_classes
  np.testing.assert_allclose(
      batch['loss_weight'].sum(axis=(1, 2)), 256, rtol=1e-4
  )
  val = coco_panoptic.CocoPanopticSource(root, 'val')
  efn = functools.partial(
      preprocess.preprocess_eval, image_size=32, mask_size=16
  )
  (b,) = list(
      pipeline.make_eval_batches(
          val, batch_size=4, preprocess_fn=efn, shard_index=0, shard_count=1
      )
  )
  np.testing.assert_array_equal(b['_mask'], [True, True, True, False])
  np.testing.assert_array_equal(b['image_id'][:3], val.image_ids())
  np.testing.assert_array_equal(b['image'][3], b['image'][0])  # padding copy


def test_one_worker_process_matches_in_process():
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  src = FakeSource(10)
  make = functools.partial(
      pipeline.make_train_loader,
      src,
      batch_size=3,
      seed=2,
      preprocess_fn=train_fn,
  )
  it = make(num_workers=1)
  got = [{k: np.array(v) for k, v in b.items()} for b in _take(it, 4)]
  del it  # stops the worker and releases its shared memory
  gc.collect()
  for x, y in zip(got, _take(make(), 4), strict=True):
    np.testing.assert_array_equal(x['image_id'], y['image_id'])
    np.testing.assert_array_equal(x['noise'], y['noise'])
