"""Checkpoint errors that tell the truth, on tiny pytrees (no model needed).

A checkpoint restored into a differently shaped target fails before orbax
reads an array, naming the first differing path, both shapes and the
workdir's config.json; every bad `config.model_init` path says its real
reason (missing, unsupported format, not an array file, pickle refused).
"""

import json
import pickle
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pix2seq_d_jax import checkpointing, config_lib
from pix2seq_d_jax.models import weight_import


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: object


def _state(width):
  params = {"enc": {"w": jnp.arange(4.0 * width).reshape(4, width)},
            "b": jnp.zeros(3)}
  return _State(step=jnp.array(7), params=params,
                opt_state=optax.adam(1e-3).init(params))


@pytest.fixture
def workdir(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path), keep=2)
  checkpointing.save(manager, 7, _state(64), b'{"pos": 3}')
  manager.wait_until_finished()
  manager.close()
  return tmp_path


def _abstract(width):
  return jax.eval_shape(lambda: _state(width))


def test_roundtrip_restores_values_and_data_state(workdir):
  manager = checkpointing.make_manager(str(workdir), keep=2)
  state, data = checkpointing.restore(manager, 7, _abstract(64))
  np.testing.assert_array_equal(state.params["enc"]["w"],
                                _state(64).params["enc"]["w"])
  assert int(state.step) == 7 and data == b'{"pos": 3}'
  # The iterator state stays readable JSON inside the checkpoint.
  saved = json.loads((workdir / "checkpoints" / "7" / "data" /
                      "metadata").read_text())
  assert saved == {"kind": "bytes", "value": '{"pos": 3}'}


def test_capped_write_is_read_back_by_a_plain_manager(tmp_path):
  # The cap on bytes written at once changes how, not what, is written.
  # The largest array, enc/w, is 4 * 64 float32 = 1,024 bytes.
  cap = checkpointing.write_cap_bytes(_abstract(64), floor_bytes=1)
  assert cap == 2 * 1024
  capped = checkpointing.make_manager(str(tmp_path), keep=2,
                                      save_concurrent_bytes=cap)
  checkpointing.save(capped, 3, _state(64), b'{"pos": 1}')
  capped.wait_until_finished()
  capped.close()
  plain = checkpointing.make_manager(str(tmp_path), keep=2)
  state, data = checkpointing.restore(plain, 3, _abstract(64))
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(64)),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  assert data == b'{"pos": 1}'
  plain.close()
  with pytest.raises(ValueError, match="save_concurrent_bytes=0"):
    checkpointing.make_manager(str(tmp_path), keep=2, save_concurrent_bytes=0)


# Orbax's failed write leaves its event loop's callbacks behind.
@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")
def test_write_cap_is_in_bytes_and_must_exceed_the_largest_array(tmp_path):
  # Orbax writes an array in one piece and refuses one that does not fit
  # under the cap: at exactly enc/w's 1,024 bytes the write fails, which it
  # would not if the cap were read in any larger unit.
  too_small = checkpointing.make_manager(str(tmp_path), keep=2,
                                         save_concurrent_bytes=1024)
  with pytest.raises(ValueError, match="Requested more bytes"):
    checkpointing.save(too_small, 3, _state(64), b"{}")
    too_small.wait_until_finished()
  assert too_small.all_steps() == []  # Nothing half-written is a step.
  too_small.close()
  # The floor applies to small states; big arrays double it.
  assert checkpointing.write_cap_bytes(_abstract(64)) == 100 * 10**6
  big = {"w": jax.ShapeDtypeStruct((10**8,), jnp.float32),
         "n": jax.ShapeDtypeStruct((), jnp.int32)}
  assert checkpointing.write_cap_bytes(big) == 8 * 10**8


def test_other_model_config_names_path_and_shapes(workdir):
  manager = checkpointing.make_manager(str(workdir), keep=2)
  with pytest.raises(checkpointing.CheckpointMismatchError) as info:
    checkpointing.restore(manager, 7, _abstract(128))
  message = str(info.value)
  assert isinstance(info.value, config_lib.ConfigError)  # CLIs: exit 2.
  assert "\n" not in message
  # The first differing leaf in the target's order, both shapes.
  assert ("params/enc/w has shape (4, 64) in the checkpoint but (4, 128) "
          "in this config") in message
  assert f"{workdir}/checkpoints/7" in message
  assert str(workdir / "config.json") in message
  assert "strict" not in message
  # The same check guards config.resume / model_init from another run.
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"params/enc/w has shape \(4, 64\)"):
    checkpointing.restore_weights(str(workdir), _abstract(128))


def test_missing_and_extra_parameters_are_named(workdir):
  manager = checkpointing.make_manager(str(workdir), keep=2)
  bigger = _abstract(64).replace(
      params={**_abstract(64).params,
              "dec": jax.ShapeDtypeStruct((2,), jnp.float32)})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"params/dec \(2,\) is in the config's model but "
                     "not in it"):
    checkpointing.check_compatible(manager, 7, bigger)
  smaller = _abstract(64).replace(params={"enc": _abstract(64).params["enc"]})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match="is in it but not in the model"):
    checkpointing.check_compatible(manager, 7, smaller)


def test_subtree_restore_reads_only_the_named_fields(workdir):
  # A predictor's read: only `params` here (the EMA weights in training
  # states), for a workdir, its checkpoints folder and a step folder.
  for path in (workdir, workdir / "checkpoints",
               workdir / "checkpoints" / "7"):
    restored = checkpointing.restore_subtree(str(path), _abstract(64),
                                             ("params",))
    assert set(restored) == {"params"}
    jax.tree.map(np.testing.assert_array_equal, restored["params"],
                 _state(64).params)
  # The whole state is still checked first: a wrong model is named.
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"params/enc/w has shape \(4, 64\)"):
    checkpointing.restore_subtree(str(workdir), _abstract(128), ("params",))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpointing.restore_subtree(str(workdir / "nowhere"), _abstract(64),
                                  ("params",))


def _write(path, content):
  path.write_bytes(content)
  return str(path)


def _npy_bytes(tmp_path):
  np.save(tmp_path / "one.npy", np.ones(3))
  return (tmp_path / "one.npy").read_bytes()


def _torch_like_zip(path):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"conv1.weight": 1}))
  return str(path)


@pytest.mark.parametrize("case, exc, fragments", [
    ("missing", FileNotFoundError, ["does not exist", "a step folder"]),
    ("empty_dir", FileNotFoundError, ["no finalized checkpoint under"]),
    ("pth", ValueError, ["unsupported format '.pth'", "PyTorch pickle",
                         "safetensors.torch.save_file", ".npz or "
                         ".safetensors"]),
    ("npy", ValueError, ["unsupported format '.npy'", "a single array"]),
    ("npy_as_npz", ValueError, ["a single .npy array"]),
    ("garbage_npz", ValueError, ["not a ResNet-50 array file",
                                 "not a readable .npz archive"]),
    ("garbage_safetensors", ValueError, ["not a ResNet-50 array file",
                                         "safetensors"]),
    ("pickle_npz", ValueError, ["a Python pickle", "pickled content "
                                "refused"]),
    ("torch_zip", ValueError, ["a PyTorch torch.save archive",
                               "pickled content refused"]),
    ("wrong_keys", ValueError, ["cannot tell the ResNet-50 layout",
                                "conv1.weight"]),
])
def test_bad_model_init_says_why(tmp_path, case, exc, fragments):
  paths = {
      "missing": lambda: str(tmp_path / "nope.npz"),
      "empty_dir": lambda: str(tmp_path),
      "pth": lambda: _write(tmp_path / "r50.pth", pickle.dumps({})),
      "npy": lambda: _write(tmp_path / "w.npy", _npy_bytes(tmp_path)),
      "npy_as_npz": lambda: _write(tmp_path / "w.npz", _npy_bytes(tmp_path)),
      "garbage_npz": lambda: _write(tmp_path / "w.npz", b"garbage!" * 9),
      "garbage_safetensors": lambda: _write(
          tmp_path / "w.safetensors", b"\xff" * 64),
      "pickle_npz": lambda: _write(tmp_path / "w.npz", pickle.dumps([1])),
      "torch_zip": lambda: _torch_like_zip(tmp_path / "w.npz"),
      "wrong_keys": lambda: (np.savez(tmp_path / "w.npz", a=np.ones(2)),
                             str(tmp_path / "w.npz"))[1],
  }
  path = paths[case]()
  with pytest.raises(exc) as info:
    if case in ("missing", "empty_dir"):
      # What config.resume and predict's --checkpoint say.
      checkpointing.restore_weights(path, _abstract(64))
    else:
      # A config.model_init file that is no export (train routes it here).
      assert not weight_import.is_backbone_export(path)
      raise weight_import.explain_not_an_export(path)
  message = str(info.value)
  assert repr(path) in message or path in message
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  if case != "empty_dir":
    assert "no finalized checkpoint" not in message
