"""Tests of ImageNet ResNet-50 weight import into the Pix2SeqD backbone.

Exports are written by the tests from seeded random arrays named and shaped
like torchvision's and Keras' ResNet-50 (depths 3, 4, 6, width 64), in `.npz`
and in `.safetensors` (written by a small writer here, independent of the
reader). They load into a freshly initialised Pix2SeqD with the paper's
backbone and a tiny rest, and the stem feature map of `encode` is compared
with a NumPy conv + batch norm + ReLU computed from the export's arrays.
"""

import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pix2seq_d_jax import models
from pix2seq_d_jax.models import weight_import

DEPTHS, WIDTH, IMAGE, MASK = (3, 4, 6), 64, 64, 32
TORCH_MEAN = np.array([0.485, 0.456, 0.406])
TORCH_STD = np.array([0.229, 0.224, 0.225])
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])


# ------------------------------------------------------------ export makers


class _Maker:
  """Seeded random arrays with a record of what each key is."""

  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)
    self.arrays = {}
    self.ignored = []
    self.folded = []

  def normal(self, shape, scale=1.0):
    return (scale * self.rng.standard_normal(shape)).astype(np.float32)

  def uniform(self, shape):
    return self.rng.uniform(0.5, 1.5, shape).astype(np.float32)


def _torchvision_export(seed=0):
  """torchvision ResNet-50 state dict for layers 1-3, plus ignored keys."""
  mk = _Maker(seed)

  def conv(name, out_ch, in_ch, k):
    fan_in = in_ch * k * k
    mk.arrays[f"{name}.weight"] = mk.normal((out_ch, in_ch, k, k),
                                            fan_in ** -0.5)

  def bn(name, c):
    mk.arrays[f"{name}.weight"] = mk.uniform(c)
    mk.arrays[f"{name}.bias"] = mk.normal(c, 0.1)
    mk.arrays[f"{name}.running_mean"] = mk.normal(c, 0.1)
    mk.arrays[f"{name}.running_var"] = mk.uniform(c)
    mk.arrays[f"{name}.num_batches_tracked"] = np.array(7, np.int64)
    mk.ignored.append(f"{name}.num_batches_tracked")

  conv("conv1", WIDTH, 3, 7)
  bn("bn1", WIDTH)
  in_ch = WIDTH
  for g, depth in enumerate(DEPTHS, start=1):
    f = WIDTH * 2 ** (g - 1)
    for b in range(depth):
      p = f"layer{g}.{b}"
      conv(f"{p}.conv1", f, in_ch, 1)
      bn(f"{p}.bn1", f)
      conv(f"{p}.conv2", f, f, 3)
      bn(f"{p}.bn2", f)
      conv(f"{p}.conv3", 4 * f, f, 1)
      bn(f"{p}.bn3", 4 * f)
      if b == 0:
        conv(f"{p}.downsample.0", 4 * f, in_ch, 1)
        bn(f"{p}.downsample.1", 4 * f)
      in_ch = 4 * f
  # Group 4 and the classifier are not part of our truncated model.
  for key, shape in (("layer4.0.conv1.weight", (512, 1024, 1, 1)),
                     ("layer4.0.bn1.running_var", (512,)),
                     ("fc.weight", (1000, 2048)), ("fc.bias", (1000,))):
    mk.arrays[key] = mk.normal(shape)
    mk.ignored.append(key)
  return mk


def _keras_export(seed=1):
  """Keras ResNet50 weights for conv1-conv4 (BN names with ':0')."""
  mk = _Maker(seed)

  def conv(name, in_ch, out_ch, k, scale=1.0):
    mk.arrays[f"{name}/kernel"] = mk.normal((k, k, in_ch, out_ch),
                                            scale * (in_ch * k * k) ** -0.5)
    mk.arrays[f"{name}/bias"] = mk.normal(out_ch, 0.1)
    mk.folded.append(f"{name}/bias")

  def bn(name, c):
    # TF2 Keras variable names end in ':0'; the loader strips it.
    mk.arrays[f"{name}/gamma:0"] = mk.uniform(c)
    mk.arrays[f"{name}/beta:0"] = mk.normal(c, 0.1)
    mk.arrays[f"{name}/moving_mean:0"] = mk.normal(c, 0.1)
    mk.arrays[f"{name}/moving_variance:0"] = mk.uniform(c)

  # Keras' stem sees 0..255 pixels: a 100x smaller kernel keeps O(1) maps.
  conv("conv1_conv", 3, WIDTH, 7, scale=1 / 100)
  bn("conv1_bn", WIDTH)
  in_ch = WIDTH
  for g, depth in enumerate(DEPTHS, start=1):
    f = WIDTH * 2 ** (g - 1)
    for b in range(1, depth + 1):
      p = f"conv{g + 1}_block{b}"
      if b == 1:
        conv(f"{p}_0_conv", in_ch, 4 * f, 1)
        bn(f"{p}_0_bn", 4 * f)
      conv(f"{p}_1_conv", in_ch, f, 1)
      bn(f"{p}_1_bn", f)
      conv(f"{p}_2_conv", f, f, 3)
      bn(f"{p}_2_bn", f)
      conv(f"{p}_3_conv", f, 4 * f, 1)
      bn(f"{p}_3_bn", 4 * f)
      in_ch = 4 * f
  for key, shape in (("conv5_block1_1_conv/kernel", (1, 1, 1024, 512)),
                     ("conv5_block1_1_bn/gamma:0", (512,)),
                     ("predictions/kernel", (2048, 1000)),
                     ("predictions/bias", (1000,))):
    mk.arrays[key] = mk.normal(shape)
    mk.ignored.append(key)
  mk.folded.sort()
  return mk


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
              np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
              np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}


def _write_safetensors(path, arrays):
  """Writes {name: array or ('BF16', uint16 array)} as a safetensors file."""
  header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, a in arrays.items():
    if isinstance(a, tuple):
      dtype_name, a = a
    else:
      dtype_name = _ST_DTYPES[a.dtype]
    data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": dtype_name, "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp("exports")
  torch, keras = _torchvision_export(), _keras_export()
  paths = dict(torch_npz=root / "r50_torch.npz",
               torch_st=root / "r50_torch.safetensors",
               keras_npz=root / "r50_keras.npz")
  np.savez(paths["torch_npz"], **torch.arrays)
  _write_safetensors(paths["torch_st"], torch.arrays)
  np.savez(paths["keras_npz"], **keras.arrays)
  return dict(torch=torch, keras=keras, root=root,
              **{k: str(v) for k, v in paths.items()})


@pytest.fixture(scope="module")
def model_and_vars():
  model = models.get_model(
      "pix2seq_d", mask_size=(MASK, MASK), num_outputs=16,
      backbone_depths=DEPTHS, backbone_width=WIDTH, enc_layers=1, enc_dim=32,
      enc_mlp_dim=32, enc_heads=2, fuse_dim=8, dec_dim=8, dec_dim_mults=(1, 2),
      dec_transformer_layers=1, dec_transformer_dim=16, dec_heads=2)
  image = jnp.zeros((1, IMAGE, IMAGE, 3))
  x_t = jnp.zeros((1, MASK, MASK, 16))
  init = jax.jit(lambda r: nn.unbox(
      model.init(r, image, x_t, jnp.ones((1,)), train=False)))
  return model, init(jax.random.key(0))


@pytest.fixture(scope="module")
def stem_fn(model_and_vars):
  model, _ = model_and_vars

  @jax.jit
  def stem(params, batch_stats, image):
    # The stem's _NormAct output is conv -> batch norm -> ReLU.
    _, state = model.apply(
        {"params": params, "batch_stats": batch_stats}, image, train=False,
        method="encode", mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "stem_norm")
    return state["intermediates"]["backbone"]["stem_norm"]["__call__"][0]

  return stem


def _load(path, model_and_vars, **kwargs):
  _, variables = model_and_vars
  return weight_import.load_backbone_weights(
      path, variables["params"], variables["batch_stats"], **kwargs)


def _bb(tree, *path):
  return np.asarray(traverse_util.flatten_dict(tree["backbone"])[path])


def _np_conv(x, kernel, stride, pad):
  """float64 NHWC conv with symmetric zero padding; kernel HWIO."""
  k = kernel.shape[0]
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
  win = win[:, ::stride, ::stride]  # [b, oh, ow, c, kh, kw]
  return np.einsum("bijchw,hwco->bijo", win, kernel.astype(np.float64))


def _np_bn_relu(y, scale, bias, mean, var, eps):
  return np.maximum((y - mean) / np.sqrt(var + eps) * scale + bias, 0.0)


# -------------------------------------------------------------------- tests


def test_torchvision_npz_values_and_report(exports, model_and_vars):
  _, variables = model_and_vars
  a = exports["torch"].arrays
  params, stats, report = _load(exports["torch_npz"], model_and_vars)

  np.testing.assert_array_equal(
      _bb(params, "stem_conv", "kernel"),
      a["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      _bb(params, "group3_block1", "proj_conv", "kernel"),
      a["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  # torchvision conv2 (the strided 3x3) is our conv1; bn{k} is norm{k-1}.
  np.testing.assert_array_equal(
      _bb(params, "group2_block1", "conv1", "kernel"),
      a["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      _bb(stats, "group2_block2", "norm1", "bn", "var"),
      a["layer2.1.bn2.running_var"])
  np.testing.assert_array_equal(
      _bb(stats, "group1_block3", "norm2", "bn", "mean"),
      a["layer1.2.bn3.running_mean"])
  np.testing.assert_array_equal(
      _bb(params, "group3_block6", "norm2", "bn", "scale"),
      a["layer3.5.bn3.weight"])
  np.testing.assert_array_equal(
      _bb(params, "stem_norm", "bn", "bias"), a["bn1.bias"])

  # Every other leaf is the input's own; the inputs are not modified.
  for name in ("encoder", "pyramid", "decoder"):
    for old, new in zip(jax.tree.leaves(variables["params"][name]),
                        jax.tree.leaves(params[name]), strict=True):
      assert new is old
  assert not np.array_equal(_bb(variables["params"], "stem_conv", "kernel"),
                            _bb(params, "stem_conv", "kernel"))
  new_leaf = traverse_util.flatten_dict(params)[
      ("backbone", "stem_conv", "kernel")]
  old_leaf = traverse_util.flatten_dict(variables["params"])[
      ("backbone", "stem_conv", "kernel")]
  assert isinstance(new_leaf, jax.Array)
  assert new_leaf.sharding == old_leaf.sharding
  assert new_leaf.dtype == old_leaf.dtype

  num_leaves = (len(jax.tree.leaves(variables["params"]["backbone"])) +
                len(jax.tree.leaves(variables["batch_stats"]["backbone"])))
  assert report["num_loaded"] == num_leaves == 129 + 86
  assert report["layout"] == "torchvision"
  assert report["ignored_keys"] == sorted(exports["torch"].ignored)
  assert report["folded_keys"] == []


def test_safetensors_export_loads_like_npz(exports, model_and_vars):
  p1, s1, r1 = _load(exports["torch_npz"], model_and_vars)
  p2, s2, r2 = _load(exports["torch_st"], model_and_vars)
  assert r1 == r2
  for t1, t2 in ((p1, p2), (s1, s2)):
    for x, y in zip(jax.tree.leaves(t1), jax.tree.leaves(t2), strict=True):
      np.testing.assert_array_equal(x, y)


def test_read_safetensors_dtypes(tmp_path):
  rng = np.random.default_rng(3)
  f32 = rng.standard_normal((2, 3)).astype(np.float32)
  f16 = rng.standard_normal((4,)).astype(np.float16)
  i64 = np.array([[-5, 2**40]], np.int64)
  u8 = np.arange(6, dtype=np.uint8).reshape(3, 2)
  # bfloat16 values exact in 8 mantissa bits, given as their raw bits.
  bf16_values = np.array([1.0, -2.5, 0.15625, 2.0**127], np.float32)
  bf16_bits = (bf16_values.view(np.uint32) >> 16).astype(np.uint16)
  path = tmp_path / "t.safetensors"
  _write_safetensors(path, {"a": f32, "b": f16, "c": i64, "d": u8,
                            "e": ("BF16", bf16_bits), "s": np.float64(2.5)})
  out = weight_import.read_safetensors(str(path))
  assert sorted(out) == ["a", "b", "c", "d", "e", "s"]
  np.testing.assert_array_equal(out["a"], f32)
  assert out["b"].dtype == np.float16 and out["c"].dtype == np.int64
  np.testing.assert_array_equal(out["b"], f16)
  np.testing.assert_array_equal(out["c"], i64)
  np.testing.assert_array_equal(out["d"], u8)
  assert out["e"].dtype == np.float32
  np.testing.assert_array_equal(out["e"], bf16_values)
  assert out["s"].shape == () and out["s"] == 2.5

  # A header longer than the file, and plain garbage: one ValueError naming
  # the file, whatever the safetensors library reports.
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(struct.pack("<Q", 10_000) + b"{}")
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"this is not a safetensors file at all")
  for path in (bad, garbage):
    with pytest.raises(ValueError,
                       match=f"{path.name}: not a readable safetensors"):
      weight_import.read_safetensors(str(path))


def test_keras_npz_values(exports, model_and_vars):
  a = exports["keras"].arrays
  params, stats, report = _load(exports["keras_npz"], model_and_vars)
  np.testing.assert_array_equal(
      _bb(params, "group3_block1", "proj_conv", "kernel"),
      a["conv4_block1_0_conv/kernel"])
  np.testing.assert_array_equal(
      _bb(params, "group2_block4", "conv1", "kernel"),
      a["conv3_block4_2_conv/kernel"])
  np.testing.assert_array_equal(
      _bb(stats, "group2_block2", "norm1", "bn", "var"),
      a["conv3_block2_2_bn/moving_variance:0"])
  np.testing.assert_array_equal(
      _bb(params, "group1_block1", "proj_norm", "bn", "scale"),
      a["conv2_block1_0_bn/gamma:0"])
  # A conv bias before batch norm shifts the running mean by itself.
  np.testing.assert_allclose(
      _bb(stats, "group3_block2", "norm0", "bn", "mean"),
      a["conv4_block2_1_bn/moving_mean:0"] - a["conv4_block2_1_conv/bias"],
      rtol=1e-6, atol=1e-7)
  # The stem is rewritten from BGR caffe input to RGB mean/std input.
  np.testing.assert_allclose(
      _bb(params, "stem_conv", "kernel"),
      a["conv1_conv/kernel"][:, :, ::-1, :] * (255 * TORCH_STD)[:, None],
      rtol=1e-6)
  assert report["layout"] == "keras"
  assert report["num_loaded"] == 129 + 86
  assert report["ignored_keys"] == sorted(exports["keras"].ignored)
  assert report["folded_keys"] == exports["keras"].folded

  raw, _, _ = _load(exports["keras_npz"], model_and_vars,
                    convert_keras_input=False)
  np.testing.assert_array_equal(_bb(raw, "stem_conv", "kernel"),
                                a["conv1_conv/kernel"])


def test_torchvision_stem_of_encode_matches_numpy(exports, model_and_vars,
                                                  stem_fn):
  a = exports["torch"].arrays
  params, stats, _ = _load(exports["torch_npz"], model_and_vars)
  image = np.random.default_rng(5).uniform(size=(1, IMAGE, IMAGE, 3))
  got = np.asarray(stem_fn(params, stats, jnp.asarray(image, jnp.float32)))
  z = (image - TORCH_MEAN) / TORCH_STD
  y = _np_conv(z, a["conv1.weight"].transpose(2, 3, 1, 0), 2, 3)
  want = _np_bn_relu(y, a["bn1.weight"], a["bn1.bias"],
                     a["bn1.running_mean"], a["bn1.running_var"], 1e-5)
  assert got.shape == want.shape == (1, IMAGE // 2, IMAGE // 2, WIDTH)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert (want > 0).mean() > 0.2  # the comparison is not of zeros


def test_keras_stem_of_encode_matches_keras_convention(exports,
                                                       model_and_vars,
                                                       stem_fn):
  a = exports["keras"].arrays
  params, stats, _ = _load(exports["keras_npz"], model_and_vars)
  image = np.random.default_rng(6).uniform(size=(1, IMAGE, IMAGE, 3))
  got = np.asarray(stem_fn(params, stats, jnp.asarray(image, jnp.float32)))
  # Keras: BGR, 0..255, caffe means subtracted, conv + bias, BN (eps 1.001e-5).
  caffe = 255.0 * image[..., ::-1] - CAFFE_MEAN_BGR
  y = _np_conv(caffe, a["conv1_conv/kernel"], 2, 3) + a["conv1_conv/bias"]
  want = _np_bn_relu(y, a["conv1_bn/gamma:0"], a["conv1_bn/beta:0"],
                     a["conv1_bn/moving_mean:0"],
                     a["conv1_bn/moving_variance:0"], 1.001e-5)
  # Outputs whose 7x7 window reaches the padding differ (zero padding is in
  # different input spaces); rows/columns 2..30 see only pixels.
  inner = (slice(None), slice(2, 31), slice(2, 31))
  np.testing.assert_allclose(got[inner], want[inner], rtol=1e-4, atol=1e-4)
  assert (want[inner] > 0).mean() > 0.2


def _rewrite(exports, name, change):
  arrays = dict(exports["torch"].arrays)
  change(arrays)
  path = exports["root"] / name
  np.savez(path, **arrays)
  return str(path)


def test_shape_mismatch_names_key_and_path(exports, model_and_vars):
  def change(arrays):
    arrays["layer2.0.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  path = _rewrite(exports, "mismatch.npz", change)
  with pytest.raises(ValueError) as e:
    _load(path, model_and_vars)
  msg = str(e.value)
  assert "layer2.0.conv2.weight [128, 128, 1, 1]" in msg
  assert "params/backbone/group2_block1/conv1/kernel [3, 3, 128, 128]" in msg


def test_missing_and_unknown_keys(exports, model_and_vars):
  path = _rewrite(exports, "missing.npz",
                  lambda arrays: arrays.pop("layer3.5.bn3.running_var"))
  with pytest.raises(ValueError, match="has no value for 1 of our") as e:
    _load(path, model_and_vars)
  assert "batch_stats/backbone/group3_block6/norm2/bn/var" in str(e.value)

  def add(arrays):
    arrays["layer3.6.conv1.weight"] = np.zeros((256, 1024, 1, 1), np.float32)
    arrays["head.weight"] = np.zeros((3,), np.float32)
  path = _rewrite(exports, "unknown.npz", add)
  with pytest.raises(ValueError, match="2 torchvision export key") as e:
    _load(path, model_and_vars)
  assert "head.weight" in str(e.value)
  assert "layer3.6.conv1.weight" in str(e.value)


def test_group_norm_backbone_is_rejected(exports):
  params = {"backbone": {"stem_norm": {"gn": {"scale": np.ones(WIDTH)}}}}
  with pytest.raises(ValueError, match="backbone_norm='batch'"):
    weight_import.load_backbone_weights(exports["torch_npz"], params,
                                        {"backbone": {}})


def test_is_backbone_export(exports, tmp_path):
  for key in ("torch_npz", "torch_st", "keras_npz"):
    assert weight_import.is_backbone_export(exports[key])
  other = tmp_path / "other.npz"
  np.savez(other, kernel=np.zeros(3))
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00notjs")
  not_zip = tmp_path / "not_zip.npz"
  not_zip.write_bytes(b"junk")
  msgpack = tmp_path / "ckpt.msgpack"
  msgpack.write_bytes(b"\x00")
  absent = tmp_path / "absent.npz"
  for path in (other, junk, not_zip, msgpack, tmp_path, absent):
    assert not weight_import.is_backbone_export(str(path))


def test_trainer_model_init_loads_backbone_into_params_and_ema(
    exports, model_and_vars):
  from pix2seq_d_jax import train, train_state

  _, variables = model_and_vars
  params = variables["params"]
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables["batch_stats"], opt_state=(),
      ema_params=jax.tree.map(jnp.copy, params))
  loaded = train._init_weights(state, exports["torch_npz"], None)
  expected = exports["torch"].arrays["conv1.weight"].transpose(2, 3, 1, 0)
  for tree in (loaded.params, loaded.ema_params):
    np.testing.assert_array_equal(_bb(tree, "stem_conv", "kernel"), expected)
    np.testing.assert_array_equal(
        tree["decoder"]["conv_out"]["kernel"],
        params["decoder"]["conv_out"]["kernel"])
  np.testing.assert_array_equal(
      _bb(loaded.batch_stats, "stem_norm", "bn", "var"),
      exports["torch"].arrays["bn1.running_var"])
