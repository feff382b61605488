"""Tests of the per-example numpy preprocessing ops."""

import numpy as np
import pytest
from PIL import Image

from pix2seq_d_jax.data import preprocess as pp

# Label -> colour table with well separated colours, so a resized image pixel
# far from a label boundary must show exactly its label's colour.
LUT = np.array(
    [
        [0, 0, 0],
        [250, 10, 10],
        [10, 250, 10],
        [10, 10, 250],
        [250, 250, 10],
        [10, 250, 250],
    ],
    np.uint8,
)


def _block_example(h, w, block, seed=0):
  """Random block label maps and an image whose colour encodes the label."""
  rng = np.random.default_rng(seed)
  gh, gw = -(-h // block), -(-w // block)
  sem = np.kron(rng.integers(1, 6, (gh, gw)), np.ones((block, block), int))
  inst = np.kron(rng.integers(0, 4, (gh, gw)), np.ones((block, block), int))
  sem, inst = sem[:h, :w].astype(np.int32), inst[:h, :w].astype(np.int32)
  return {
      'image': LUT[sem],
      'semantic': sem,
      'instance': inst,
      'crowd': sem == 4,
      'image_id': np.int64(7),
  }


def _uniform_3x3(x):
  # Border pixels never count: their neighbours may lie outside a crop.
  p = np.pad(x, 1, constant_values=-1)
  h, w = x.shape
  return np.all(
      [
          p[dy : dy + h, dx : dx + w] == x
          for dy in range(3)
          for dx in range(3)
      ],
      axis=0,
  )


def test_resize_labels_nearest():
  x = np.array([[1, 2], [3, 4]], np.int32)
  np.testing.assert_array_equal(
      pp.resize_labels(x, 4), np.repeat(np.repeat(x, 2, 0), 2, 1)
  )
  y = np.arange(16).reshape(4, 4)
  # Pixel centres of a 2x2 output fall on input rows/cols 1 and 3.
  np.testing.assert_array_equal(pp.resize_labels(y, 2), [[5, 7], [13, 15]])
  rng = np.random.default_rng(0)
  z = np.kron(rng.integers(0, 50, (6, 5)), np.ones((4, 4), int))
  out = pp.resize_labels(z, (37, 29))
  assert out.dtype == z.dtype
  assert set(np.unique(out)) == set(np.unique(z))


@pytest.mark.parametrize(
    ('src', 'dst'), [((5, 7), (3, 11)), ((6, 4), (13, 9)), ((2, 3), (49, 103))]
)
def test_resize_labels_matches_pil_nearest(src, dst):
  # (2, 49): the float product (i + 0.5) * (2 / 49) lands just below an
  # integer at i = 24 (0.999...), where exact arithmetic gives 1.
  labels = np.arange(src[0] * src[1], dtype=np.int32).reshape(src)
  pil = Image.fromarray(labels).resize(
      (dst[1], dst[0]), Image.Resampling.NEAREST
  )
  np.testing.assert_array_equal(pp.resize_labels(labels, dst), np.asarray(pil))


def test_resize_labels_channels_and_errors():
  labels = np.array([[1, 2, 3], [4, 5, 6]])
  out = pp.resize_labels(np.stack([labels, labels * 10], -1), (3, 5))
  np.testing.assert_array_equal(out[..., 1], out[..., 0] * 10)
  with pytest.raises(ValueError, match='positive'):
    pp.resize_labels(labels, (0, 4))
  with pytest.raises(ValueError, match=r'\[h, w\]'):
    pp.resize_labels(np.zeros(3, np.int32), 2)


def test_resize_image_bilinear():
  const = np.full((5, 7, 3), 99, np.uint8)
  np.testing.assert_array_equal(
      pp.resize_image(const, (11, 3)), np.full((11, 3, 3), 99)
  )
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (8, 6, 3)).astype(np.uint8)
  as_float = pp.resize_image(img.astype(np.float32), (16, 12))
  np.testing.assert_allclose(
      pp.resize_image(img, (16, 12)), as_float, atol=1.0
  )


@pytest.mark.parametrize('seed', range(4))
def test_lsj_crop_keeps_alignment_exactly(seed):
  # Longer side 64 = 32 * 2: the rescale is the identity, only the crop moves.
  ex = _block_example(48, 64, block=3, seed=seed)
  out = pp.large_scale_jitter(
      ex, np.random.default_rng(seed), output_size=32, scale_range=(2.0, 2.0)
  )
  np.testing.assert_array_equal(out['image'], LUT[out['semantic']])
  np.testing.assert_array_equal(out['crowd'], out['semantic'] == 4)
  assert out['valid'].all()
  np.testing.assert_array_equal(out['valid_size'], [32, 32])
  # The crop is a window of the input at some offset.
  hits = [
      (y, x)
      for y in range(17)
      for x in range(33)
      if np.array_equal(
          ex['semantic'][y : y + 32, x : x + 32], out['semantic']
      )
      and np.array_equal(
          ex['instance'][y : y + 32, x : x + 32], out['instance']
      )
  ]
  assert hits


@pytest.mark.parametrize('seed', range(4))
def test_lsj_rescale_keeps_alignment_and_pads(seed):
  ex = _block_example(30, 50, block=10, seed=seed)
  out = pp.large_scale_jitter(
      ex, np.random.default_rng(seed), output_size=40, scale_range=(0.5, 2.0)
  )
  assert out['image'].shape == (40, 40, 3)
  vh, vw = out['valid_size']
  assert out['valid'][:vh, :vw].all() and out['valid'].sum() == vh * vw
  pad = ~out['valid']
  assert (out['image'][pad] == 0).all() and (out['semantic'][pad] == 0).all()
  assert (out['instance'][pad] == 0).all() and not out['crowd'][pad].any()
  inner = _uniform_3x3(out['semantic']) & out['valid']
  assert inner.sum() > 20
  np.testing.assert_allclose(
      out['image'][inner], LUT[out['semantic'][inner]], atol=1
  )


def test_flip_aligned_both_ways():
  ex = _block_example(6, 10, block=2)
  seen = set()
  for seed in range(10):
    out = pp.random_flip(ex, np.random.default_rng(seed))
    flipped = not np.array_equal(out['semantic'], ex['semantic'])
    seen.add(flipped)
    ref = (lambda a: a[:, ::-1]) if flipped else (lambda a: a)
    for key in ('image', 'semantic', 'instance', 'crowd'):
      np.testing.assert_array_equal(out[key], ref(ex[key]))
  assert seen == {True, False}


def test_color_jitter():
  rng = np.random.default_rng(0)
  img = rng.uniform(size=(6, 5, 3)).astype(np.float32)
  np.testing.assert_array_equal(pp.color_jitter(img, rng, 0.0), img)
  out = pp.color_jitter(img, rng, 1.0)
  assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
  assert not np.allclose(out, img)
  grey = np.repeat(img[..., :1], 3, axis=-1)
  g = pp.color_jitter(grey, rng, 1.0)
  np.testing.assert_allclose(g[..., 0], g[..., 1], atol=1e-6)
  np.testing.assert_allclose(g[..., 0], g[..., 2], atol=1e-6)


# Large ids take the np.unique path instead of np.bincount.
@pytest.mark.parametrize('id_scale', [1, 10**6])
def test_random_instance_ids_bijective_and_in_range(id_scale):
  inst = np.array([[0, 3, 3, 9], [9, 9, 40, 0], [5, 5, 5, 5]], np.int32)
  inst *= id_scale
  sem = np.where(inst > 0, 2, 1).astype(np.int32)
  for seed in range(5):
    new, new_sem = pp.assign_random_instance_ids(
        inst, np.random.default_rng(seed), 16, semantic=sem
    )
    np.testing.assert_array_equal(new == 0, inst == 0)
    np.testing.assert_array_equal(new_sem, sem)
    pairs = set(zip(inst.ravel(), new.ravel(), strict=True)) - {(0, 0)}
    assert len(pairs) == 4  # one new id per old id ...
    assert len({b for _, b in pairs}) == 4  # ... and distinct
    assert all(1 <= b <= 15 for _, b in pairs)


def test_random_instance_ids_overflow_drops_smallest():
  # Instances 1..5 with areas 5, 4, 3, 2, 1; only 3 ids (1..3) available.
  inst = np.array(
      [1] * 5 + [2] * 4 + [3] * 3 + [4] * 2 + [5] + [0], np.int32
  ).reshape(4, 4)
  sem = np.full((4, 4), 7, np.int32)
  new, new_sem = pp.assign_random_instance_ids(
      inst, np.random.default_rng(0), 4, semantic=sem
  )
  dropped = (inst == 4) | (inst == 5)
  assert (new[dropped] == 0).all() and (new_sem[dropped] == 0).all()
  np.testing.assert_array_equal(new_sem[~dropped], 7)
  assert sorted({int(new[inst == k][0]) for k in (1, 2, 3)}) == [1, 2, 3]


def test_loss_weights_hand_computed():
  sem = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]])
  inst = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [5, 5, 0, 0], [5, 5, 0, 0]])
  # Segments: (1, 0) has 8 pixels, (2, 5) 4, void (0, 0) 4; p = 1.
  raw = {8: 1 / 9, 4: 1 / 5}
  scale = 16 / (8 * raw[8] + 8 * raw[4])
  expected = np.where(sem == 1, raw[8], raw[4]) * scale
  w = pp.loss_weights(sem, inst, 1.0)
  assert w.dtype == np.float32
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  np.testing.assert_allclose(pp.loss_weights(sem, inst, 0.0), np.ones((4, 4)))
  # Padding (last column) gets 0 and is not counted in the segment sizes.
  valid = np.ones((4, 4), bool)
  valid[:, 3] = False
  w = pp.loss_weights(sem, inst, 1.0, valid)
  c = {1: 6, 2: 4, 0: 2}  # valid pixels per segment
  raw = np.where(valid, 1 / (np.vectorize(c.get)(sem) + 1), 0)
  np.testing.assert_allclose(w, raw * 16 / raw.sum(), rtol=1e-6)
  assert (w[:, 3] == 0).all()


def test_preprocess_eval_non_square():
  ex = _block_example(40, 80, block=8)
  out = pp.preprocess_eval(ex, image_size=32, mask_size=16)
  np.testing.assert_array_equal(out['orig_size'], [40, 80])
  np.testing.assert_array_equal(out['valid_size'], [16, 32])  # aspect kept
  assert (
      out['image'].shape == (32, 32, 3) and out['image'].dtype == np.float32
  )
  np.testing.assert_allclose(
      out['image'][:16], pp.resize_image(ex['image'], (16, 32)) / 255.0
  )
  assert (out['image'][16:] == 0).all()
  # Mask labels are nearest-resized from the processed full-res labels.
  for key in ('semantic', 'instance'):
    full = pp.resize_labels(ex[key], (16, 32))
    np.testing.assert_array_equal(
        out[key][:8], pp.resize_labels(full, (8, 16))
    )
  assert (out['semantic'][8:] == 0).all()
  assert (out['loss_weight'][8:] == 0).all()
  np.testing.assert_allclose(out['loss_weight'].sum(), 256, rtol=1e-5)
  assert int(out['image_id']) == 7 and out['image_id'].dtype == np.int32


def test_preprocess_train_shapes_and_determinism():
  ex = _block_example(24, 36, block=4)
  kw = dict(
      image_size=32,
      mask_size=8,
      max_instances=8,
      scale_range=(0.5, 1.5),
      flip=True,
      color_jitter_strength=0.5,
      loss_weight_power=0.2,
  )
  a = pp.preprocess_train(ex, np.random.default_rng(3), **kw)
  b = pp.preprocess_train(ex, np.random.default_rng(3), **kw)
  shapes = {k: (v.shape, v.dtype.name) for k, v in a.items()}
  assert shapes == {
      'image': ((32, 32, 3), 'float32'),
      'semantic': ((8, 8), 'int32'),
      'instance': ((8, 8), 'int32'),
      'loss_weight': ((8, 8), 'float32'),
      'image_id': ((), 'int32'),
      'orig_size': ((2,), 'int32'),
      'valid_size': ((2,), 'int32'),
  }
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert a['instance'].max() < 8 and a['image'].max() <= 1
  with pytest.raises(ValueError, match='multiple of mask_size'):
    pp.preprocess_train(
        ex, np.random.default_rng(0), **{**kw, 'mask_size': 5}
    )


def test_resize_window_equals_crop_of_full_resize():
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, (13, 21, 3)).astype(np.uint8)
  for size, window in [((40, 50), (7, 11, 20, 30)), ((9, 15), (2, 3, 7, 12))]:
    y, x, h, w = window
    full = pp.resize_image(img, size)[y : y + h, x : x + w]
    np.testing.assert_allclose(
        pp._resize_window(img, size, window), full, atol=1
    )


# ----------------------------------------------------------- rectangles


def test_preprocess_eval_fits_a_rectangle_and_pads_the_rest():
  # 20x70 into (32, 64): one factor min(32/20, 64/70) = 64/70, so the
  # content is round(20 * 64/70) = 18 rows by 64 columns, padded below.
  ex = _block_example(20, 70, block=5)
  out = pp.preprocess_eval(ex, image_size=(32, 64), mask_size=(16, 32))
  assert out['image'].shape == (32, 64, 3)
  assert out['semantic'].shape == out['instance'].shape == (16, 32)
  assert out['loss_weight'].shape == (16, 32)
  np.testing.assert_array_equal(out['valid_size'], [18, 64])
  np.testing.assert_array_equal(out['orig_size'], [20, 70])
  assert (out['image'][18:] == 0).all() and out['image'][:18].max() > 0
  # Mask rows 0..8 cover the 18 content rows; the rest is padding.
  assert (out['semantic'][9:] == 0).all()
  assert (out['loss_weight'][9:] == 0).all()
  assert out['semantic'][:9].min() > 0
  # A tall image in the same box: scaled to fit the height, padded right.
  tall = pp.preprocess_eval(_block_example(64, 20, block=4),
                            image_size=(32, 64), mask_size=(16, 32))
  np.testing.assert_array_equal(tall['valid_size'], [32, 10])
  assert (tall['image'][:, 10:] == 0).all()
  # A square size gives exactly what the int spelling gives.
  for a, b in zip(pp.preprocess_eval(ex, image_size=32, mask_size=16).values(),
                  pp.preprocess_eval(ex, image_size=(32, 32),
                                     mask_size=(16, 16)).values(),
                  strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('seed', range(3))
def test_lsj_rectangle_scales_into_the_box_and_crops(seed):
  # 30x50 into (24, 48) at s = 2: factor min(48/30, 96/50) = 1.6 -> 48x80,
  # a random 24x48 window of it; alignment stays exact.
  ex = _block_example(30, 50, block=10, seed=seed)
  out = pp.large_scale_jitter(ex, np.random.default_rng(seed),
                              output_size=(24, 48), scale_range=(2.0, 2.0))
  assert out['image'].shape == (24, 48, 3)
  assert out['semantic'].shape == out['valid'].shape == (24, 48)
  assert out['valid'].all()
  np.testing.assert_array_equal(out['valid_size'], [24, 48])
  inner = _uniform_3x3(out['semantic'])
  np.testing.assert_allclose(out['image'][inner],
                             LUT[out['semantic'][inner]], atol=1)
  # s = 0.5: 30x50 fits (12, 24) at min(12/30, 24/50) = 0.4 -> 12x20.
  small = pp.large_scale_jitter(ex, np.random.default_rng(seed),
                                output_size=(24, 48), scale_range=(0.5, 0.5))
  np.testing.assert_array_equal(small['valid_size'], [12, 20])
  assert small['valid'].sum() == 12 * 20 and small['valid'][:12, :20].all()


def test_preprocess_train_and_clip_rectangle_shapes():
  ex = _block_example(24, 36, block=4)
  kw = dict(image_size=(32, 64), mask_size=(8, 16), max_instances=8,
            scale_range=(0.5, 1.5), flip=True, color_jitter_strength=0.5)
  out = pp.preprocess_train(ex, np.random.default_rng(3), **kw)
  assert out['image'].shape == (32, 64, 3)
  for key in ('semantic', 'instance', 'loss_weight'):
    assert out[key].shape == (8, 16), key
  np.testing.assert_allclose(out['loss_weight'].sum(), 8 * 16, rtol=1e-5)
  clip = {k: np.stack([v] * 3) for k, v in ex.items() if k != 'image_id'}
  clip['image_id'] = ex['image_id']
  out = pp.preprocess_train_clip(clip, np.random.default_rng(3),
                                 proceeding_frames=(-2, -1), **kw)
  assert out['image'].shape == (32, 64, 3)
  assert out['cond_semantic'].shape == out['cond_instance'].shape == (
      2, 8, 16)
  # Identical frames, one augmentation: the conditioning maps equal the
  # target's.
  np.testing.assert_array_equal(out['cond_semantic'][1], out['semantic'])
  np.testing.assert_array_equal(out['cond_instance'][0], out['instance'])
  with pytest.raises(ValueError, match=r'the width 64 must be a multiple '
                     r'of mask_size=\(8, 24\)'):
    pp.preprocess_train(ex, np.random.default_rng(0),
                        **{**kw, 'mask_size': (8, 24)})
  with pytest.raises(ValueError, match=r'image_size=\(32, 64, 3\): expected '
                     r'a positive integer \(a square\) or a \(height, width\)'):
    pp.preprocess_eval(ex, image_size=(32, 64, 3), mask_size=8)


# Stuff 3 and 4 (4 pixels each), thing 1 (id 1, 3 pixels), thing 2 (id 2,
# 2 pixels), a crowd pixel of class 5 and 2 void pixels.
_SEM = np.array([[3, 3, 4, 4], [3, 3, 4, 4], [1, 1, 2, 0], [1, 5, 2, 0]])
_INST = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 2, 0], [1, 0, 2, 0]])
_CROWD = _SEM == 5


def _tiny_raw():
  return {'image': LUT[_SEM], 'semantic': _SEM.astype(np.int32),
          'instance': _INST.astype(np.int32), 'crowd': _CROWD,
          'image_id': np.int64(3)}


def test_number_stuff_segments_hand_case():
  # Stuff class c takes max(instance) + c = 2 + c; crowd and void keep 0.
  np.testing.assert_array_equal(
      pp.number_stuff_segments(_SEM, _INST, _CROWD),
      [[5, 5, 6, 6], [5, 5, 6, 6], [1, 1, 2, 0], [1, 0, 2, 0]])


@pytest.mark.parametrize('mode', ['random', 'zero'])
def test_preprocess_train_stuff_identity_targets_and_weights(mode):
  kw = dict(image_size=4, mask_size=4, max_instances=8, flip=False,
            loss_weight_power=1.0, stuff_identity=mode)
  out = pp.preprocess_train(_tiny_raw(), np.random.default_rng(5), **kw)
  inst, sem = out['instance'], out['semantic']
  np.testing.assert_array_equal(sem, _SEM)
  ids = {name: set(inst[mask].tolist()) for name, mask in (
      ('stuff3', _SEM == 3), ('stuff4', _SEM == 4), ('thing1', _INST == 1),
      ('thing2', _INST == 2), ('crowd', _CROWD), ('void', _SEM == 0))}
  assert all(len(v) == 1 for v in ids.values())  # One id per segment.
  ids = {k: v.pop() for k, v in ids.items()}
  assert ids['crowd'] == ids['void'] == 0
  if mode == 'random':  # Four distinct random ids in 1..7, stuff included.
    segs = [ids[k] for k in ('stuff3', 'stuff4', 'thing1', 'thing2')]
    assert len(set(segs)) == 4 and min(segs) >= 1 and max(segs) <= 7
  else:
    assert ids['stuff3'] == ids['stuff4'] == 0
    assert len({ids['thing1'], ids['thing2']}) == 2
    assert min(ids['thing1'], ids['thing2']) >= 1
  # Per-segment sizes c are the same in both modes: 4, 4, 3, 2, crowd 1,
  # void 2; p = 1 gives 1 / (c + 1), scaled to sum to 16.
  size = np.select([_SEM == 3, _SEM == 4, _INST == 1, _INST == 2, _CROWD],
                   [4, 4, 3, 2, 1], 2)
  raw = 1.0 / (size + 1.0)
  np.testing.assert_allclose(out['loss_weight'], raw * 16 / raw.sum(),
                             rtol=1e-6)


def test_preprocess_train_random_stuff_overflow_and_bad_value():
  # Ids 1..3 for four segments: the smallest (thing 2, 2 pixels) is void.
  out = pp.preprocess_train(
      _tiny_raw(), np.random.default_rng(0), image_size=4, mask_size=4,
      max_instances=4, flip=False, stuff_identity='random')
  dropped = _INST == 2
  assert (out['semantic'][dropped] == 0).all()
  assert (out['instance'][dropped] == 0).all()
  assert sorted(set(out['instance'][~dropped & (_SEM > 0) & ~_CROWD])) == [
      1, 2, 3]
  with pytest.raises(ValueError, match=r"stuff_identity='stuff'.*'random'"):
    pp.preprocess_train(_tiny_raw(), np.random.default_rng(0), image_size=4,
                        mask_size=4, max_instances=4, stuff_identity='stuff')


def test_preprocess_train_clip_random_stuff_keeps_one_id():
  raw = _tiny_raw()
  clip = {k: np.stack([raw[k]] * 2) for k in ('image', 'semantic',
                                               'instance', 'crowd')}
  clip['image_id'] = raw['image_id']
  out = pp.preprocess_train_clip(
      clip, np.random.default_rng(1), proceeding_frames=(-1,), image_size=4,
      mask_size=4, max_instances=8, flip=False, stuff_identity='random')
  np.testing.assert_array_equal(out['cond_instance'][0], out['instance'])
  for c in (3, 4):  # One nonzero id per stuff class, the same in frame -1.
    ids = set(out['instance'][_SEM == c].tolist())
    assert len(ids) == 1 and ids.pop() >= 1
