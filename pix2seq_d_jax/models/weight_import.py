"""ImageNet ResNet-50 weights (torchvision or Keras exports) for the backbone.

`load_backbone_weights` reads an ImageNet ResNet-50 export and writes its conv
kernels, batch-norm scales/biases and running averages into the `backbone`
subtree of a Pix2SeqD variable tree (`params['backbone']`,
`batch_stats['backbone']`); every other leaf is left as it is. No torch or
TensorFlow is needed: exports are `.npz` files or `.safetensors` files (read
with the `safetensors` package's numpy backend, tensor by tensor). The layout
is detected from the keys:

- torchvision (`conv1.weight` [64, 3, 7, 7] OIHW, `bn1.*`,
  `layer{g}.{i}.conv{1,2,3}.weight`, `layer{g}.{i}.bn{1,2,3}.*`,
  `layer{g}.{i}.downsample.{0,1}.*`). Kernels go OIHW -> HWIO. torchvision's
  ResNet-50 is v1.5, the stride on the 3x3 conv (`conv2`), and so is ours
  (`BottleneckBlock.conv1` is the strided 3x3): the blocks compute the same
  function. Its input convention (RGB in [0, 1], ImageNet mean/std) is ours.
- Keras `keras.applications.ResNet50` (`conv1_conv/kernel` HWIO,
  `conv1_bn/gamma|beta|moving_mean|moving_variance`,
  `conv{s}_block{i}_{0,1,2,3}_conv|bn/...`, `_0_` the shortcut; a `:0`
  suffix on names is accepted). Keras' ResNet50 is v1: it strides the first
  1x1 conv of a group's first block, ours the 3x3. The shapes are the same, so
  the weights load, but the strided block is a different function from the
  Keras one (the ImageNet features are a starting point that fine-tuning
  adapts). Keras convs have biases where ours have none (batch norm follows
  every conv): a bias c before a batch norm only shifts the mean, so it is
  folded exactly into the running mean (mean - c; in training the batch mean
  absorbs it anyway). Keras expects 'caffe' input (BGR, 0..255, mean
  subtracted, no std); with `convert_keras_input` (default) the stem kernel is
  rewritten for our input (RGB, ImageNet mean/std): channels reversed and
  scaled by 255 * std, and the small mean difference folded into the stem's
  bias (exact except in the 3-pixel border, where zero padding differs).
  Keras' batch-norm epsilon is 1.001e-5, ours 1e-5 (negligible).

In both layouts block groups past the model's last one (`layer4` / `conv5_*`
for the paper's 3-group ResNet-50) and the classifier (`fc` / `predictions`)
are ignored, as are torchvision's `num_batches_tracked` counters. Note that
both exports pad the stem max-pool by (1, 1) while ours, like the TF
reference, uses 'SAME' (0, 1) padding: a one-pixel shift after the stem.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from absl import logging
from etils import epath
from flax import traverse_util
from flax.core import meta

PyTree = Any
LAYOUTS = ("torchvision", "keras")
SUFFIXES = (".npz", ".safetensors")

# The stem kernel names that identify each layout.
_STEM_KEYS = {"torchvision": "conv1.weight", "keras": "conv1_conv/kernel"}

# Keras' 'caffe' preprocessing: BGR pixel means on the 0..255 scale.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# Our input normalisation (models/pix2seq_d.py): RGB, [0, 1], mean/std.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_TORCH_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var")}
_KERAS_BN = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
             "moving_mean": ("batch_stats", "mean"),
             "moving_variance": ("batch_stats", "var")}

_TORCH_STEM_RE = re.compile(r"(conv1|bn1)\.(\w+)")
_TORCH_BLOCK_RE = re.compile(
    r"layer(\d+)\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(\w+)")
_TORCH_GROUP_RE = re.compile(r"layer(\d+)\.")
_KERAS_STEM_RE = re.compile(r"conv1_(conv|bn)/(\w+)")
_KERAS_BLOCK_RE = re.compile(r"conv(\d+)_block(\d+)_([0-3])_(conv|bn)/(\w+)")
_KERAS_GROUP_RE = re.compile(r"conv(\d+)_")
_OUR_BLOCK_RE = re.compile(r"group(\d+)_block(\d+)")


class _Target(NamedTuple):
  """Where one export array goes.

  kind: 'leaf' (assign), 'fold' (a Keras conv bias folded into the running
  mean at `path`) or 'ignore'. path: key path under the backbone of
  `collection`. transform: 'oihw' (transpose to HWIO), 'keras_stem' or ''.
  """
  kind: str
  collection: str = ""
  path: tuple[str, ...] = ()
  transform: str = ""


_IGNORE = _Target("ignore")


def _strip(key: str) -> str:
  # TF2 Keras names variables 'layer/kernel:0'; Keras 3 drops the suffix.
  return key[:-2] if key.endswith(":0") else key


# ------------------------------------------------------------------ readers


def _open_safetensors(
    path: str,
) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """Lists a safetensors file's keys; the reader maps single tensors lazily."""
  try:
    handle = safetensors.safe_open(path, framework="numpy")
  except (safetensors.SafetensorError, OSError) as e:
    raise ValueError(f"{path}: not a readable safetensors file: {e}") from e

  def get(key: str) -> np.ndarray:
    try:
      array = handle.get_tensor(key)
    except (safetensors.SafetensorError, TypeError) as e:
      raise ValueError(f"{path}: cannot read tensor {key!r}: {e}") from e
    # numpy has no bfloat16 of its own; the weights are used as float32.
    if array.dtype == jnp.bfloat16:
      array = array.astype(np.float32)
    return array

  return list(handle.keys()), get


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a `.safetensors` file (bfloat16 becomes float32).

  Args:
    path: the file.

  Returns:
    {name: array} in the file's dtypes (native byte order).

  Raises:
    ValueError: on a malformed header or entry (naming the file and key).
  """
  keys, get = _open_export(path, suffix=".safetensors")
  return {k: get(k) for k in keys}


def _npz_array(path: str, key: str) -> np.ndarray:
  with np.load(path, allow_pickle=False) as npz:
    return np.asarray(npz[key])


def _open_export(
    path: str, suffix: str | None = None
) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """Lists an export's keys and returns a reader for single arrays.

  Arrays are read on demand so the ignored groups (most of a ResNet-50's
  weights are in `layer4`) are never loaded.
  """
  suffix = suffix or epath.Path(path).suffix
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"backbone export {path!r} does not exist or is "
                            "not a file.")
  local = _local_file(path)
  if suffix == ".npz":
    try:
      npz = np.load(local, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
      raise ValueError(f"{path}: not a readable .npz archive: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
      raise ValueError(f"{path}: holds a single .npy array; expected an .npz "
                       "archive of named arrays.")
    # The archive is reopened per read so no file handle outlives the call.
    npz.close()
    return list(npz.files), lambda k: _npz_array(local, k)
  if suffix == ".safetensors":
    return _open_safetensors(local)
  raise ValueError(f"backbone export {path!r} has suffix {suffix!r}; "
                   f"expected one of {SUFFIXES}.")


def _local_file(path: str) -> str:
  """`path` itself if local; else a copy in the temp folder, fetched once.

  safetensors maps the file into memory and `np.load` reopens the archive
  for each array, so an export in a bucket is read from a local copy (keyed
  by the URL and the object's size and mtime, so a replaced export is
  fetched again).
  """
  if "://" not in path:
    return path
  remote = epath.Path(path)
  stat = remote.stat()
  key = hashlib.sha256(
      f"{path}|{stat.length}|{stat.mtime}".encode()).hexdigest()[:16]
  local = os.path.join(
      tempfile.gettempdir(), "pix2seq_d_jax_exports", key, remote.name)
  if not os.path.isfile(local):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    remote.copy(tmp, overwrite=True)
    os.replace(tmp, local)
  return local


def read_export(path: str) -> dict[str, np.ndarray]:
  """Reads every array of a `.npz` or `.safetensors` export.

  Args:
    path: the file.

  Returns:
    {name: array}.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: on an unsupported suffix or a malformed file.
  """
  keys, get = _open_export(path)
  return {k: get(k) for k in keys}


def detect_layout(keys: list[str], source: str = "export") -> str:
  """Names the export layout ('torchvision' or 'keras') from its keys.

  Args:
    keys: the export's array names.
    source: what the keys came from, for the error message.

  Returns:
    One of LAYOUTS.

  Raises:
    ValueError: if neither stem kernel name is present (lists a few keys).
  """
  names = {_strip(k) for k in keys}
  found = [lay for lay in LAYOUTS if _STEM_KEYS[lay] in names]
  if len(found) != 1:
    raise ValueError(
        f"{source}: cannot tell the ResNet-50 layout; expected exactly one "
        f"of the stem kernels {sorted(_STEM_KEYS.values())}, found "
        f"{found or 'neither'}; first keys: {sorted(keys)[:6]}.")
  return found[0]


def is_backbone_export(path: str) -> bool:
  """Whether `path` is a ResNet-50 export this module can load.

  True for an existing `.npz` / `.safetensors` file whose keys name a
  torchvision or Keras stem kernel; False for anything else (for instance a
  checkpoint folder), so the trainer can route `config.model_init`. Only the
  key list is read.

  Args:
    path: a file or folder path.

  Returns:
    Whether it is a loadable backbone export.
  """
  if not path.endswith(SUFFIXES) or not epath.Path(path).is_file():
    return False
  try:
    keys, _ = _open_export(path)
    detect_layout(keys, path)
  except (ValueError, OSError) as e:
    logging.info("%s is not a backbone export: %s", path, e)
    return False
  return True


# ----------------------------------------------------------------- mapping


def _bn_target(kind_map: dict, module: tuple[str, ...], field: str):
  if field not in kind_map:
    return None
  collection, leaf = kind_map[field]
  return _Target("leaf", collection, (*module, "bn", leaf))


def _map_torchvision(key: str, num_groups: int) -> _Target | None:
  """Maps one torchvision key to its target; None when unknown."""
  if key.endswith(".num_batches_tracked") or re.fullmatch(r"fc\.\w+", key):
    return _IGNORE
  group = _TORCH_GROUP_RE.match(key)
  if group and int(group.group(1)) > num_groups:
    return _IGNORE
  m = _TORCH_STEM_RE.fullmatch(key)
  if m:
    if m.group(1) == "conv1":
      return (_Target("leaf", "params", ("stem_conv", "kernel"), "oihw")
              if m.group(2) == "weight" else None)
    return _bn_target(_TORCH_BN, ("stem_norm",), m.group(2))
  m = _TORCH_BLOCK_RE.fullmatch(key)
  if not m:
    return None
  g, i, layer, field = m.groups()
  block = f"group{int(g)}_block{int(i) + 1}"
  if layer == "downsample.0":
    return (_Target("leaf", "params", (block, "proj_conv", "kernel"), "oihw")
            if field == "weight" else None)
  if layer == "downsample.1":
    return _bn_target(_TORCH_BN, (block, "proj_norm"), field)
  # torchvision conv{k}/bn{k} are our conv{k-1}/norm{k-1}.
  index = int(layer[-1]) - 1
  if layer.startswith("conv"):
    return (_Target("leaf", "params", (block, f"conv{index}", "kernel"),
                    "oihw") if field == "weight" else None)
  return _bn_target(_TORCH_BN, (block, f"norm{index}"), field)


def _map_keras(key: str, num_groups: int) -> _Target | None:
  """Maps one Keras key (':0' stripped) to its target; None when unknown."""
  if re.fullmatch(r"predictions/\w+", key):
    return _IGNORE
  group = _KERAS_GROUP_RE.match(key)
  # Keras stage s (conv2..conv5) is our group s - 1; conv1 is the stem.
  if group and int(group.group(1)) > num_groups + 1:
    return _IGNORE
  m = _KERAS_STEM_RE.fullmatch(key)
  if m:
    conv_or_bn, field = m.groups()
    module = ("stem_conv",) if conv_or_bn == "conv" else ("stem_norm",)
    transform = "keras_stem"
  else:
    m = _KERAS_BLOCK_RE.fullmatch(key)
    if not m or int(m.group(1)) < 2:
      return None
    s, i, index, conv_or_bn, field = m.groups()
    block = f"group{int(s) - 1}_block{int(i)}"
    if index == "0":
      name = "proj_conv" if conv_or_bn == "conv" else "proj_norm"
    else:
      name = f"{'conv' if conv_or_bn == 'conv' else 'norm'}{int(index) - 1}"
    module = (block, name)
    transform = ""
  if conv_or_bn == "bn":
    return _bn_target(_KERAS_BN, module, field)
  if field == "kernel":
    return _Target("leaf", "params", (*module, "kernel"), transform)
  if field == "bias":
    # The batch norm after this conv: swap the conv's name for the norm's.
    norm = module[-1].replace("conv", "norm")
    return _Target("fold", "batch_stats", (*module[:-1], norm, "bn", "mean"),
                   transform)
  return None


def _caffe_delta() -> np.ndarray:
  """Keras' input value (0..255 scale) where ours is 0, per RGB channel."""
  mean_rgb = np.asarray(_IMAGENET_MEAN, np.float64)
  caffe_rgb = np.asarray(_CAFFE_MEAN_BGR[::-1], np.float64)
  return 255.0 * mean_rgb - caffe_rgb


def _keras_stem(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rewrites a Keras stem kernel [7, 7, 3 BGR, o] for our normalised input.

  Keras sees k_bgr(c) = 255 x_c - caffe_mean_c; we feed z_c = (x_c - mu_c) /
  std_c, so k(c) = 255 std_c z_c + delta_c with delta_c = 255 mu_c -
  caffe_mean_c. The kernel becomes K[:, :, 2 - c] * 255 std_c and delta adds
  the constant sum K delta per output channel, returned as an extra bias.

  Args:
    kernel: float [7, 7, 3, o] HWIO with BGR input channels.

  Returns:
    (float32 [7, 7, 3, o] kernel for RGB mean/std input, float64 [o] bias).
  """
  rgb = kernel.astype(np.float64)[:, :, ::-1, :]
  scale = 255.0 * np.asarray(_IMAGENET_STD, np.float64)
  extra_bias = np.einsum("hwco,c->o", rgb, _caffe_delta())
  return (rgb * scale[:, None]).astype(np.float32), extra_bias


# ------------------------------------------------------------------ loading


def _backbone(tree: Mapping, name: str, path: str) -> dict:
  if not isinstance(tree, Mapping) or "backbone" not in tree:
    keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    raise ValueError(f"loading {path}: {name} has no 'backbone' subtree "
                     f"(keys: {keys}); expected Pix2SeqD variables.")
  return traverse_util.flatten_dict(tree["backbone"])


def _leaf_value(leaf: Any) -> Any:
  return leaf.unbox() if isinstance(leaf, meta.AxisMetadata) else leaf


def _place(old: Any, value: np.ndarray) -> Any:
  """`value` in the old leaf's dtype, box and (if a jax.Array) sharding."""
  if isinstance(old, meta.AxisMetadata):
    return old.replace_boxed(_place(old.unbox(), value))
  value = np.asarray(value, dtype=old.dtype)
  if isinstance(old, jax.Array):
    # Every process builds its own shards, so this also works multi-host.
    return jax.make_array_from_callback(value.shape, old.sharding,
                                        lambda index: value[index])
  return value


def _with_backbone(tree: Mapping, updates: dict) -> PyTree:
  """A copy of `tree` with leaves under 'backbone' replaced by `updates`."""
  flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
  for path, value in updates.items():
    full = ("backbone", *path)
    flat[full] = _place(flat[full], value)
  out = traverse_util.unflatten_dict(flat)
  if isinstance(tree, flax.core.FrozenDict):
    return flax.core.freeze(out)
  return out


def _fmt(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _few(items: list[str], n: int = 8) -> str:
  more = f" (and {len(items) - n} more)" if len(items) > n else ""
  return ", ".join(items[:n]) + more


def load_backbone_weights(
    path: str,
    params: PyTree,
    batch_stats: PyTree,
    *,
    convert_keras_input: bool = True,
) -> tuple[PyTree, PyTree, dict[str, Any]]:
  """Loads an ImageNet ResNet-50 export into the Pix2SeqD backbone.

  Every conv kernel, batch-norm scale/bias and running mean/variance of
  `params['backbone']` / `batch_stats['backbone']` is replaced exactly once;
  all other leaves are returned as they are. The new leaves keep the old
  leaves' dtype, `nn.Partitioned` box and jax sharding. See the module
  docstring for the two layouts and how each maps onto our ResNet.

  Args:
    path: `.npz` or `.safetensors` file in the torchvision or Keras layout.
    params: the model's params (`{'backbone': {...}, ...}`), plain arrays or
      boxed; backbone_norm must be 'batch'.
    batch_stats: the model's batch statistics (`{'backbone': {...}}`).
    convert_keras_input: rewrite a Keras stem for our RGB mean/std input
      (Keras expects BGR caffe input); ignored for torchvision.

  Returns:
    (params, batch_stats, report): new trees and a dict with `num_loaded`
    (leaves assigned), `ignored_keys` (sorted export keys not used),
    `folded_keys` (sorted Keras conv biases folded into running means) and
    `layout`.

  Raises:
    FileNotFoundError: if `path` is not a file.
    ValueError: on an unknown layout, a group-norm backbone, export keys the
      model has no place for, shape mismatches (naming the export key and
      shape and our path and shape) or backbone leaves the export lacks.
  """
  keys, get = _open_export(path)
  layout = detect_layout(keys, path)
  ours = {"params": _backbone(params, "params", path),
          "batch_stats": _backbone(batch_stats, "batch_stats", path)}
  if any("gn" in p for p in ours["params"]):
    raise ValueError(
        f"loading {path}: the model's backbone uses group norm "
        "(backbone_norm='group'); ImageNet exports carry batch-norm weights, "
        "so set model.backbone_norm='batch'.")
  blocks = [_OUR_BLOCK_RE.fullmatch(p[0]) for p in ours["params"]]
  num_groups = max((int(m.group(1)) for m in blocks if m), default=0)
  mapper = _map_torchvision if layout == "torchvision" else _map_keras

  assigned: dict[tuple[str, tuple[str, ...]], str] = {}
  folds: list[tuple[str, _Target]] = []
  ignored, unknown, mismatched = [], [], []
  for key in sorted(keys):
    target = mapper(_strip(key), num_groups)
    if target is None or (target.kind != "ignore" and
                          target.path not in ours[target.collection]):
      unknown.append(key)
    elif target.kind == "ignore":
      ignored.append(key)
    elif target.kind == "fold":
      if any(t.path == target.path for _, t in folds):
        raise ValueError(
            f"loading {path}: two conv biases fold into batch_stats/"
            f"backbone/{_fmt(target.path)}; the second is {key!r}.")
      folds.append((key, target))
    else:
      slot = (target.collection, target.path)
      if slot in assigned:
        raise ValueError(
            f"loading {path}: export keys {assigned[slot]!r} and {key!r} "
            f"both map to {target.collection}/backbone/"
            f"{_fmt(target.path)}.")
      assigned[slot] = key
  if unknown:
    raise ValueError(
        f"loading {path}: {len(unknown)} {layout} export key(s) have no "
        f"place in the model's backbone ({num_groups} block groups): "
        f"{_few(unknown)}.")
  missing = [f"{c}/backbone/{_fmt(p)}" for c in ours for p in ours[c]
             if (c, p) not in assigned]
  if missing:
    raise ValueError(
        f"loading {path}: the {layout} export has no value for "
        f"{len(missing)} of our backbone leaves: {_few(missing)}.")

  updates = {"params": {}, "batch_stats": {}}
  stem_bias = None
  for (collection, leaf_path), key in assigned.items():
    target = mapper(_strip(key), num_groups)
    value = get(key)
    if target.transform == "oihw" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif (target.transform == "keras_stem" and convert_keras_input and
          leaf_path[-1] == "kernel" and value.shape[2:3] == (3,)):
      value, stem_bias = _keras_stem(value)
    want = _leaf_value(ours[collection][leaf_path]).shape
    if value.shape != tuple(want):
      mismatched.append(
          f"{key} {list(get(key).shape)} -> {collection}/backbone/"
          f"{_fmt(leaf_path)} {list(want)}")
    updates[collection][leaf_path] = value
  if mismatched:
    raise ValueError(
        f"loading {path}: shape mismatch (export key [export shape] -> our "
        f"path [expected HWIO/our shape]): {_few(mismatched, 5)}.")

  for key, target in folds:
    bias = get(key).astype(np.float64)
    if target.transform == "keras_stem" and stem_bias is not None:
      bias = bias + stem_bias
    mean = updates["batch_stats"][target.path]
    if bias.shape != mean.shape:
      raise ValueError(
          f"loading {path}: conv bias {key} {list(bias.shape)} cannot fold "
          f"into batch_stats/backbone/{_fmt(target.path)} "
          f"{list(mean.shape)}.")
    updates["batch_stats"][target.path] = mean.astype(np.float64) - bias
  if stem_bias is not None and not any(
      t.transform == "keras_stem" for _, t in folds):
    # A bias-free Keras stem still owes the mean-difference constant.
    mean_path = ("stem_norm", "bn", "mean")
    updates["batch_stats"][mean_path] = (
        updates["batch_stats"][mean_path].astype(np.float64) - stem_bias)

  report = dict(num_loaded=len(assigned), ignored_keys=ignored,
                folded_keys=sorted(k for k, _ in folds), layout=layout)
  logging.info("Loaded %d backbone leaves from %s (%s layout); ignored %d "
               "keys, folded %d conv biases.", len(assigned), path, layout,
               len(ignored), len(folds))
  return (_with_backbone(params, updates["params"]),
          _with_backbone(batch_stats, updates["batch_stats"]), report)


# ------------------------------------------------- why a file is not one

_EXPECTED = (
    "expected a workdir, its checkpoints/ folder, a step folder, or a "
    f"ResNet-50 export {' or '.join(SUFFIXES)}"
)
# Hints for formats people commonly point config.model_init at.
_FORMAT_HINTS = {
    ".pth": "a PyTorch pickle; save its state_dict with "
    "safetensors.torch.save_file(state_dict, 'r50.safetensors')",
    ".npy": "a single array; save the named arrays with np.savez",
    ".h5": "a Keras HDF5 file; save the named arrays with np.savez",
}
_FORMAT_HINTS[".pt"] = _FORMAT_HINTS[".bin"] = _FORMAT_HINTS[".pth"]
_FORMAT_HINTS[".keras"] = _FORMAT_HINTS[".h5"]


def explain_not_an_export(path: str) -> Exception:
  """The real reason the file `path` is not a loadable ResNet-50 export.

  For `config.model_init` pointing at a file that `is_backbone_export`
  rejects: a missing file, an unsupported format (with a hint for common
  ones), a single `.npy` array, a pickle or `torch.save` archive (refused:
  loading a pickle can run code), an unreadable archive, or arrays whose
  keys name no known layout.

  Returns:
    A FileNotFoundError or ValueError with a one-line message naming `path`.
  """
  file = epath.Path(path)
  if not file.exists():
    return FileNotFoundError(f"{path!r} does not exist ({_EXPECTED})")
  suffix = file.suffix.lower()
  if suffix not in SUFFIXES:
    hint = _FORMAT_HINTS.get(suffix, "")
    return ValueError(
        f"{path!r}: unsupported format {suffix or '(no suffix)'!r}"
        f"{f' ({hint})' if hint else ''}; {_EXPECTED}"
    )
  with file.open("rb") as f:
    head = f.read(8)
  # np.load(allow_pickle=False) refuses these with a generic message.
  refused = "pickled content refused (loading a pickle can run code)"
  if head.startswith(b"\x93NUMPY"):
    reason = "a single .npy array, not an archive of named arrays"
  elif head[:1] == b"\x80":
    reason = f"a Python pickle: {refused}"
  elif _is_torch_archive(file):
    reason = f"a PyTorch torch.save archive: {refused}"
  else:
    try:
      detect_layout(list(read_export(path)), path)
      reason = "readable, yet not routed as an export"
    except (OSError, ValueError) as e:
      reason = f"not a ResNet-50 array file: {e}"
  return ValueError(f"{path!r}: {reason}; {_EXPECTED}")


def _is_torch_archive(file: epath.Path) -> bool:
  """True for a `torch.save` zip (it holds a `data.pkl`)."""
  with file.open("rb") as f:
    if not zipfile.is_zipfile(f):
      return False
    f.seek(0)
    return any(n.endswith("data.pkl") for n in zipfile.ZipFile(f).namelist())
