"""Tests of the model package: registry, shapes, state, wiring, scale, dtype.

Tiny models get random variables on the shapes `jax.eval_shape(init)` gives:
a real jitted `init` compiles slowly on CPU, and several kernels start at
zero by design, which would hide whether an input reaches the output.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pix2seq_d_jax import models
from pix2seq_d_jax.models import (
    layers,
    pix2seq_d,
    pyramid,
    transformer,
    transunet,
)

B, IMAGE, MASK, BITS, OUTPUTS, FUSE, DEC = 2, 32, 16, 16, 24, 16, 16
TINY = dict(
    mask_size=(MASK, MASK), num_bits=BITS, num_outputs=OUTPUTS,
    backbone_depths=(1, 1, 1), backbone_width=8, enc_layers=1, enc_dim=32,
    enc_mlp_dim=64, enc_heads=2, fuse_dim=FUSE, dec_dim=DEC,
    dec_dim_mults=(1, 2), dec_transformer_layers=1, dec_transformer_dim=32,
    dec_heads=2)


@pytest.fixture(autouse=True, scope='module')
def _fast_compiles():
  # These tests check plumbing and values, not speed: skipping most XLA
  # optimisations roughly halves their compile time on CPU.
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _inputs(seed, cond_channels=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  image = jax.random.uniform(k1, (B, IMAGE, IMAGE, 3))
  x_t = 0.1 * jax.random.normal(k2, (B, MASK, MASK, BITS))
  gamma = jax.random.uniform(k3, (B,))
  cond = jax.random.normal(k4, (B, MASK, MASK, cond_channels))
  return image, x_t, gamma, cond


def _abstract(model, image, x_t, gamma, **kwargs):
  init = functools.partial(model.init, train=False, **kwargs)
  return nn.unbox(jax.eval_shape(init, jax.random.key(0), image, x_t, gamma))


def _abstract_params(**overrides):
  model = models.get_model('pix2seq_d', **{**TINY, **overrides})
  image, x_t, gamma, cond = _inputs(0, model.cond_channels)
  kwargs = {}
  if model.self_cond:
    kwargs['self_cond_x0'] = x_t
  if model.cond_channels:
    kwargs['cond_map'] = cond
  return _abstract(model, image, x_t, gamma, **kwargs)['params']


def _random_variables(abstract, seed=0):
  """Well-scaled random values for an abstract variable tree."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1].key)
    if name == 'kernel':
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:  # biases and running means
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.cache
def _tiny(conditional='cat+attn'):
  """A tiny float32 model, random variables and jitted entry points."""
  model = models.get_model('pix2seq_d', conditional=conditional, **TINY)
  variables = _random_variables(_abstract(model, *_inputs(0)[:3]))
  apply = functools.partial(model.apply, variables)
  fns = dict(
      encode=jax.jit(functools.partial(apply, method='encode', train=False)),
      encode_train=jax.jit(functools.partial(
          apply, method='encode', train=True, mutable=['batch_stats'],
          rngs={'dropout': jax.random.key(5)})),
      encode_eval_mutable=jax.jit(functools.partial(
          apply, method='encode', train=False, mutable=['batch_stats'])),
      decode=jax.jit(functools.partial(apply, method='decode', train=False)),
      call=jax.jit(functools.partial(apply, train=False)))
  return variables, fns


def test_registry_lookup_and_error():
  model = models.get_model('pix2seq_d', mask_size=(8, 8))
  assert isinstance(model, pix2seq_d.Pix2SeqD)
  assert models.MODELS['pix2seq_d'] is pix2seq_d.Pix2SeqD
  with pytest.raises(ValueError, match=r"'nope'.*pix2seq_d"):
    models.get_model('nope')


def test_sinusoids_match_numpy():
  pos = np.array([0.0, 1.5, 30.0], np.float32)
  rates = 1.0 / 10000.0 ** (2 * np.arange(4) / 8)
  want = np.concatenate([np.sin(pos[:, None] * rates),
                         np.cos(pos[:, None] * rates)], -1)
  np.testing.assert_allclose(transformer.sinusoidal_1d(jnp.asarray(pos), 8),
                             want, rtol=1e-5, atol=1e-6)
  # 2-D: the first half encodes the row, the second half the column, each
  # rescaled to [0, 2π].
  code = np.asarray(transformer.sinusoidal_2d(3, 5, 8)).reshape(3, 5, 8)
  rows = transformer.sinusoidal_1d(jnp.arange(3) / 2 * 2 * np.pi, 4)
  cols = transformer.sinusoidal_1d(jnp.arange(5) / 4 * 2 * np.pi, 4)
  np.testing.assert_allclose(code[:, :, :4],
                             np.repeat(np.asarray(rows)[:, None], 5, 1),
                             atol=1e-6)
  np.testing.assert_allclose(code[:, :, 4:],
                             np.repeat(np.asarray(cols)[None], 3, 0),
                             atol=1e-6)


def test_upsample_nearest_and_drop_path():
  x = np.arange(12, dtype=np.float32).reshape(2, 2, 3, 1)
  want = np.stack([np.kron(x[i, :, :, 0], np.ones((2, 3)))
                   for i in range(2)])[..., None]
  np.testing.assert_array_equal(pyramid.upsample_nearest(x, (2, 3)), want)

  ones = jnp.ones((64, 3, 4))
  drop = transformer.DropPath(0.5)
  out = drop.apply({}, ones, train=True, rngs={'dropout': jax.random.key(0)})
  per_example = np.asarray(out).reshape(64, -1)
  # Each example is dropped or kept whole; kept ones are scaled by 1 / keep.
  assert set(np.unique(per_example)) <= {0.0, 2.0}
  assert np.all(per_example.min(1) == per_example.max(1))
  assert 0 < (per_example[:, 0] == 0).sum() < 64
  np.testing.assert_array_equal(drop.apply({}, ones, train=False), ones)


def test_shapes_dtypes_and_encode_decode_equals_call():
  variables, fns = _tiny()
  image, x_t, gamma, _ = _inputs(3)
  enc = fns['encode'](image)
  assert enc['features'].shape == (B, MASK, MASK, FUSE)
  assert enc['tokens'].shape == (B, (IMAGE // 16) ** 2, 32)
  out = fns['decode'](x_t, gamma, enc)
  assert out.shape == (B, MASK, MASK, OUTPUTS) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 1e-2
  np.testing.assert_allclose(fns['call'](image, x_t, gamma), out, rtol=1e-5,
                             atol=1e-5)


def test_rectangular_model_has_the_square_parameters():
  # (h, w) = (MASK, 2 * MASK) masks of (IMAGE, 2 * IMAGE) images: the same
  # parameters as the square model (positions are fixed sinusoids of the
  # 2x4 token grid), applied on the rectangle.
  rect = models.get_model('pix2seq_d', **{**TINY, 'mask_size': (MASK,
                                                                2 * MASK)})
  image = jax.random.uniform(jax.random.key(1), (B, IMAGE, 2 * IMAGE, 3))
  x_t = 0.1 * jax.random.normal(jax.random.key(2), (B, MASK, 2 * MASK, BITS))
  gamma = jnp.full((B,), 0.5)
  abstract = _abstract(rect, image, x_t, gamma)
  assert jax.tree.map(lambda x: x.shape, abstract['params']) == jax.tree.map(
      lambda x: x.shape, _abstract_params())
  variables = _random_variables(abstract)
  enc = jax.jit(functools.partial(rect.apply, method='encode', train=False))(
      variables, image)
  assert enc['tokens'].shape == (B, (IMAGE // 16) * (2 * IMAGE // 16), 32)
  assert enc['features'].shape == (B, MASK, 2 * MASK, FUSE)
  out = jax.jit(functools.partial(rect.apply, method='decode', train=False))(
      variables, x_t, gamma, enc)
  assert out.shape == (B, MASK, 2 * MASK, OUTPUTS)
  assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 1e-2
  with pytest.raises(ValueError, match=r'x_t shape \(2, 16, 16, 16\); '
                     r'expected \(2, 16, 32, 16\)'):
    rect.apply(variables, x_t[:, :, :MASK], gamma, enc, train=False,
               method='decode')


def test_batch_stats_train_updates_eval_keeps():
  variables, fns = _tiny()
  image, _, _, _ = _inputs(4)
  _, new = fns['encode_train'](image)
  # After one training step the stem norm's running mean is
  # 0.9·old + 0.1·(batch mean of the stem conv output); redo the conv in lax.
  x = (image - jnp.asarray(pix2seq_d.IMAGENET_MEAN)) / jnp.asarray(
      pix2seq_d.IMAGENET_STD)
  kernel = variables['params']['backbone']['stem_conv']['kernel']
  stem = jax.lax.conv_general_dilated(
      x, kernel, (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  old = variables['batch_stats']['backbone']['stem_norm']['bn']['mean']
  np.testing.assert_allclose(
      new['batch_stats']['backbone']['stem_norm']['bn']['mean'],
      0.9 * old + 0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)

  enc, same = fns['encode_eval_mutable'](image)
  jax.tree.map(np.testing.assert_array_equal, same['batch_stats'],
               variables['batch_stats'])
  # Eval uses the running averages, so an example's features do not depend
  # on the other examples of its batch.
  other = fns['encode'](image.at[1].set(1.0 - image[1]))
  np.testing.assert_allclose(other['features'][0], enc['features'][0],
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(other['features'][1] - enc['features'][1]).max()) > 0


def test_time_and_attention_conditioning_are_wired():
  image, x_t, gamma, _ = _inputs(6)
  enc = _tiny()[1]['encode'](image)
  for conditional in ('cat+attn', 'cat'):
    decode = _tiny(conditional)[1]['decode']
    out = decode(x_t, gamma, enc)
    # Changing γ of example 1 changes its output, and only its output.
    out_g = decode(x_t, gamma.at[1].add(0.3), enc)
    np.testing.assert_allclose(out_g[0], out[0], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out_g[1] - out[1]).max()) > 1e-3
    # The tokens reach the output only through cross-attention.
    enc_t = dict(enc, tokens=enc['tokens'] + 1.0)
    diff = float(jnp.abs(decode(x_t, gamma, enc_t) - out).max())
    if conditional == 'cat':
      assert diff == 0.0
    else:
      assert diff > 1e-3


def test_parameter_sets_follow_the_options():
  def conv_in(params):
    return params['decoder']['conv_in']['kernel'].shape

  assert conv_in(_abstract_params()) == (1, 1, BITS + FUSE, DEC)
  assert conv_in(_abstract_params(self_cond=True)) == (1, 1, 2 * BITS + FUSE,
                                                       DEC)
  assert conv_in(_abstract_params(cond_channels=32)) == (1, 1,
                                                         BITS + FUSE + 32, DEC)

  def names(params):
    return {jax.tree_util.keystr(path)
            for path, _ in jax.tree_util.tree_leaves_with_path(params)}

  attn = names(_abstract_params())
  cat = names(_abstract_params(conditional='cat'))
  assert any('cross_attn' in n for n in attn)
  assert not any('cross_attn' in n for n in cat)
  assert cat < attn


def test_every_weight_has_logical_axis_names():
  model = models.get_model('pix2seq_d', **TINY)
  init = functools.partial(model.init, train=False)
  boxed = jax.eval_shape(init, jax.random.key(0), *_inputs(0)[:3])['params']
  leaves = jax.tree.leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned)
                        for x in leaves)
  assert all(len(x.names) == len(x.value.shape) for x in leaves)
  used = {n for x in leaves for n in x.names}
  assert used == {'conv_h', 'conv_w', 'conv_in', 'conv_out', 'embed', 'mlp',
                  'heads', 'norm'}
  specs = nn.get_partition_spec(boxed)
  assert jax.tree.structure(specs) == jax.tree.structure(nn.unbox(boxed))


def test_frozen_backbone_stops_gradients_and_keeps_stats():
  model = models.get_model('pix2seq_d', freeze_backbone=True, **TINY)
  image = _inputs(8)[0]
  variables = _tiny()[0]

  def loss(params):
    enc, state = model.apply(
        dict(variables, params=params), image, method='encode', train=True,
        mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
    return jnp.sum(enc['features'] ** 2) + jnp.sum(enc['tokens']), state

  grads, state = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  for part in ('backbone', 'encoder'):
    assert all(float(jnp.abs(g).max()) == 0.0
               for g in jax.tree.leaves(grads[part])), part
  assert all(float(jnp.abs(g).max()) > 0.0
             for g in jax.tree.leaves(grads['pyramid']))
  # A frozen encoder runs in inference mode: running averages stay as is.
  jax.tree.map(np.testing.assert_array_equal, state['batch_stats'],
               variables['batch_stats'])


def test_invalid_configs_raise_with_field_names():
  image, x_t, gamma, _ = _inputs(0)
  for overrides, field in (
      # 12 is not a multiple of the stride-4 size 8 of a 32² image.
      (dict(mask_size=(12, 12)), 'mask_size'),
      # 8 is, but not divisible by 2 ** 4.
      (dict(mask_size=(8, 8), dec_dim_mults=(1, 1, 1, 1, 1)), 'dec_dim_mults'),
      (dict(conditional='attn'), 'conditional')):
    model = models.get_model('pix2seq_d', **{**TINY, **overrides})
    with pytest.raises(ValueError, match=field):
      _abstract(model, image, x_t[:, :8, :8], gamma)


def test_paper_scale_parameter_count():
  model = models.get_model('pix2seq_d', mask_size=(512, 512))
  shapes = _abstract(model,
                     jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32),
                     jax.ShapeDtypeStruct((1, 512, 512, 16), jnp.float32),
                     jax.ShapeDtypeStruct((1,), jnp.float32))
  params = shapes['params']
  total = _count(params)
  print(f'Pix2Seq-D parameters: {total:,}')
  # The official TF2 code counts 94,492,480 at this recipe; we match exactly.
  assert abs(total - 94_492_480) <= 0.02 * 94_492_480
  assert total == 94_492_480
  components = {
      'resnet': (_count(params['backbone']), 8.5e6),
      'encoder transformer': (_count(params['encoder']['transformer']),
                              37.8e6),
      'pyramid merge': (_count(params['pyramid']), 4.0e6),
      'transunet': (_count(params['decoder']), 43.6e6),
      'transunet transformer': (_count(params['decoder']['transformer']),
                                25.9e6),
  }
  for name, (got, want) in components.items():
    print(f'  {name}: {got:,}')
    assert abs(got - want) <= 0.1 * want, (name, got, want)


def test_bfloat16_compute_float32_params_and_output():
  variables, fns = _tiny()
  model16 = models.get_model('pix2seq_d', dtype='bfloat16', **TINY)
  image, x_t, gamma, _ = _inputs(7)
  abstract = _abstract(model16, image, x_t, gamma)
  assert jax.tree.structure(abstract) == jax.tree.structure(variables)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))
  out32 = fns['call'](image, x_t, gamma)
  out16 = jax.jit(functools.partial(model16.apply, train=False))(
      variables, image, x_t, gamma)
  assert out16.dtype == jnp.float32
  scale = float(jnp.abs(out32).max())
  err = float(jnp.abs(out16 - out32).max())
  rms, rms_err = (float(jnp.sqrt(jnp.mean(v ** 2)))
                  for v in (out32, out16 - out32))
  print(f'bf16 vs f32: max error {err:.4f} (max |out| {scale:.3f}), '
        f'rms error {rms_err:.4f} (rms {rms:.3f})')
  assert 0.0 < err < 0.1 * scale
  assert rms_err < 0.05 * rms


def test_matmul_precision_bfloat16_rounds_the_products_only():
  variables, fns = _tiny()
  image, x_t, gamma, _ = _inputs(7)
  out32 = fns['call'](image, x_t, gamma)

  def output(precision):
    model = models.get_model('pix2seq_d', matmul_precision=precision, **TINY)
    return jax.jit(functools.partial(model.apply, train=False))(
        variables, image, x_t, gamma)

  # (Each precision name's product is checked in test_accumulation.py.)
  rounded = output('bfloat16')
  assert rounded.dtype == jnp.float32
  # bfloat16 operands: an error of the order of bfloat16's rounding.
  err = float(jnp.abs(rounded - out32).max())
  assert 1e-3 < err < 0.05 * float(jnp.abs(out32).max())
  with pytest.raises(ValueError, match='matmul_precision=.fp8.'):
    models.get_model('pix2seq_d', matmul_precision='fp8', **TINY).init(
        jax.random.key(0), image, x_t, gamma, train=False)


def test_block_remat_keeps_parameters_outputs_and_gradients():
  variables = _tiny()[0]
  image, x_t, gamma, _ = _inputs(3)

  def loss_and_grads(remat_blocks):
    model = models.get_model('pix2seq_d', remat_blocks=remat_blocks, **TINY)

    def loss(params):
      out, state = model.apply(
          dict(variables, params=params), image, x_t, gamma, train=True,
          mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
      return jnp.mean(out ** 2), state

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables['params'])

  (ref, ref_state), ref_grads = loss_and_grads('none')
  # Same parameter tree: checkpoints do not depend on the policy.
  for policy in ('full', 'dots'):
    abstract = _abstract_params(remat_blocks=policy)
    assert jax.tree.structure(abstract) == jax.tree.structure(
        variables['params'])
  # 'full' (config.remat='blocks') is compiled and compared with no remat
  # through the whole train step in test_train_state.py; here 'dots'.
  (value, state), grads = loss_and_grads('dots')
  np.testing.assert_allclose(value, ref, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6),
               grads, ref_grads)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6),
               state, ref_state)
  with pytest.raises(ValueError, match='remat_blocks'):
    _abstract_params(remat_blocks='all')


def _stack(scan, num_layers=3, **kwargs):
  return transformer.TransformerStack(
      num_layers, num_heads=2, mlp_dim=32, cross_attention=True, scan=scan,
      **kwargs)


def test_scanned_transformer_stack_equals_the_unrolled_one():
  k1, k2 = jax.random.split(jax.random.key(7))
  x = jax.random.normal(k1, (B, 5, 16))
  context = jax.random.normal(k2, (B, 3, 16))
  params = _stack(False).init(jax.random.key(0), x, context,
                              train=False)['params']
  # Initialisation runs the unrolled loop either way: the same tree and
  # values, so checkpoints and seeds do not depend on `scan`.
  scanned_init = _stack(True).init(jax.random.key(0), x, context,
                                   train=False)['params']
  jax.tree.map(np.testing.assert_array_equal, scanned_init, params)
  assert sorted(params) == ['block_0', 'block_1', 'block_2']

  def loss(module, params, x, train):
    out = module.apply({'params': params}, x, context, train=train)
    return jnp.sum(jnp.sin(out))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)),
                 static_argnums=(0, 3))
  # No dropout here, so train mode is deterministic.
  for train, remat in ((True, 'none'), (True, 'full')):
    ref, ref_grads = grad(_stack(False, remat=remat), params, x, train)
    value, grads = grad(_stack(True, remat=remat), params, x, train)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5),
                 grads, ref_grads)


def test_scanned_stack_compiles_one_block_and_draws_dropout_per_layer():
  x = jax.random.normal(jax.random.key(1), (B, 5, 16))
  module = _stack(False, num_layers=4)
  params = module.init(jax.random.key(0), x, x, train=False)['params']

  def lowered(scan):
    fn = functools.partial(_stack(scan, num_layers=4).apply, train=False)
    return jax.jit(fn).lower({'params': params}, x, x).as_text()

  unrolled, scanned = lowered(False), lowered(True)
  assert 'stablehlo.while' in scanned and 'stablehlo.while' not in unrolled
  # 4 blocks × (3 projections + out, twice, + 2 MLP) matmuls, against one.
  assert unrolled.count('stablehlo.dot_general') >= 4 * (
      scanned.count('stablehlo.dot_general'))

  # With dropout, the scan draws each block's mask from its own key: the
  # same rng gives the same output, and the output is not the eval one.
  drop = _stack(True, num_layers=4, drop_path=0.5)

  def train_out(seed):
    return drop.apply({'params': params}, x, x, train=True,
                      rngs={'dropout': jax.random.key(seed)})

  np.testing.assert_array_equal(train_out(0), train_out(0))
  assert not np.allclose(train_out(0), train_out(1))
  assert not np.allclose(train_out(0), drop.apply({'params': params}, x, x,
                                                  train=False))


def test_scanned_stack_names_missing_block_parameters():
  x = jnp.zeros((B, 5, 16))
  params = _stack(False).init(jax.random.key(0), x, x, train=False)['params']
  del params['block_2']
  with pytest.raises(ValueError, match=r"\['block_2'\].*num_layers=3"):
    _stack(True).apply({'params': params}, x, x, train=False)


def test_scan_layers_keeps_the_model_parameters_and_outputs():
  overrides = dict(enc_layers=2, dec_transformer_layers=2, enc_dropout=0.0,
                   enc_drop_path=0.0)
  abstract = _abstract_params(**overrides)
  assert jax.tree.structure(_abstract_params(
      scan_layers=True, **overrides)) == jax.tree.structure(abstract)
  model = models.get_model('pix2seq_d', **{**TINY, **overrides})
  variables = _random_variables(_abstract(model, *_inputs(0)[:3]))
  image, x_t, gamma, _ = _inputs(4)

  # Gradients through the scan are compared on the stack above; here the
  # whole model's train-mode output and batch statistics.
  def forward(scan_layers):
    model = models.get_model('pix2seq_d', scan_layers=scan_layers,
                             **{**TINY, **overrides})
    return jax.jit(functools.partial(
        model.apply, train=True, mutable=['batch_stats']))(
            variables, image, x_t, gamma)

  ref, ref_state = forward(False)
  value, state = forward(True)
  np.testing.assert_allclose(value, ref, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5),
               state, ref_state)


def test_attention_values_and_gradients_equal_a_plain_softmax():
  """The closed-form softmax derivative gives the textbook attention's."""
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (2, 5, 8))
  context = jax.random.normal(keys[1], (2, 7, 8))
  upstream = jax.random.normal(keys[2], (2, 5, 8))
  attention = transformer.MultiHeadAttention(num_heads=2)
  params = attention.init(jax.random.key(4), x, context)

  def plain(params, x, context):
    p = nn.meta.unbox(params)['params']

    def project(inputs, name):
      y = inputs @ p[name]['kernel'] + p[name]['bias']
      return y.reshape(y.shape[:-1] + (2, 4))

    q, k, v = project(x, 'query'), project(context, 'key'), project(
        context, 'value')
    logits = jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(4.0)
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    out = jnp.einsum('bnts,bsnh->btnh', weights, v).reshape(2, 5, 8)
    return out @ p['out']['kernel'] + p['out']['bias']

  def loss(fn):
    return lambda params, x, context: jnp.sum(fn(params, x, context)
                                              * upstream)

  np.testing.assert_allclose(attention.apply(params, x, context),
                             plain(params, x, context), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(attention.apply), argnums=(0, 1, 2))(params, x, context)
  expected = jax.grad(loss(plain), argnums=(0, 1, 2))(params, x, context)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                  strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scale_shift_is_a_split_dense_layer(dtype):
  """ScaleShift = layers.dense(2C) then split: same parameters, same values.

  The parameters (names, shapes, logical axes and initial values for the
  same key) are those of the dense layer it replaced, so checkpoints do not
  change; the outputs equal the dense layer's split output bit for bit.
  """
  emb = jax.random.normal(jax.random.key(0), (2, 24)).astype(dtype)
  module = transunet.ScaleShift(8, dtype=dtype)
  dense = layers.dense(16, ("embed", "conv_out"),
                       kernel_init=layers.fan_avg_uniform(), dtype=dtype)
  params = module.init(jax.random.key(1), emb)
  dense_params = dense.init(jax.random.key(1), emb)
  assert jax.tree.structure(params) == jax.tree.structure(dense_params)
  for got, want in zip(jax.tree.leaves(params, is_leaf=_is_boxed),
                       jax.tree.leaves(dense_params, is_leaf=_is_boxed),
                       strict=True):
    assert got.names == want.names
    np.testing.assert_array_equal(got.value, want.value)
  # Non-zero biases, so their halves must land on the right outputs.
  params = jax.tree.map(
      lambda x: x + jax.random.normal(jax.random.key(2), x.shape), params)
  scale, shift = module.apply(params, emb)
  whole = dense.apply(params, emb)[:, None, None, :]
  assert scale.shape == shift.shape == (2, 1, 1, 8)
  assert scale.dtype == shift.dtype == dtype
  np.testing.assert_array_equal(scale, whole[..., :8])
  np.testing.assert_array_equal(shift, whole[..., 8:])


def _is_boxed(x):
  return isinstance(x, nn.Partitioned)
