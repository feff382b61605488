"""Tests of config parsing, durations and validation, and shipped configs."""

import importlib
import re

import ml_collections
import numpy as np
import pytest

from pix2seq_d_jax import config_lib

SHIPPED = ("synthetic", "coco", "cityscapes", "davis", "kitti_step")


def test_parse_arg_types_flags_and_unknown_keys():
  arg = config_lib.parse_arg("n=3,lr=0.5,name=x,flag", n=1, lr=1.0, name="a",
                             flag=False, other=True)
  assert arg.n == 3 and isinstance(arg.n, int)
  assert arg.lr == 0.5 and isinstance(arg.lr, float)
  assert arg.name == "x" and arg.flag is True and arg.other is True
  assert config_lib.parse_arg(None, n=1).n == 1
  with pytest.raises(config_lib.ConfigError, match="'bogus' is unknown"):
    config_lib.parse_arg("bogus=1", n=1)
  with pytest.raises(config_lib.ConfigError,
                     match="expected a value of type int"):
    config_lib.parse_arg("n=abc", n=1)
  with pytest.raises(config_lib.ConfigError, match="needs a value"):
    config_lib.parse_arg("n", n=1)


def test_steps_conversions_and_ambiguity():
  c = ml_collections.ConfigDict(dict(total_steps=None, total_epochs=2.0))
  assert config_lib.steps("total", c, data_size=100, batch_size=10) == 20
  c = ml_collections.ConfigDict(dict(total_examples=95))
  assert config_lib.steps("total", c, batch_size=10) == 10
  c = ml_collections.ConfigDict(dict(warmup_percent=10.0))
  assert config_lib.steps("warmup", c, total_steps=250) == 25
  assert config_lib.steps("warmup", {}, default=0) == 0
  c = ml_collections.ConfigDict(dict(total_steps=5, total_epochs=1.0))
  with pytest.raises(config_lib.ConfigError, match="set only one"):
    config_lib.steps("total", c)
  with pytest.raises(config_lib.ConfigError, match="needs one of"):
    config_lib.steps("total", {})


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_lib.validate(config)


# The reference's (height, width) sizes; COCO and synthetic stay square.
SHIPPED_SIZES = {
    "synthetic": ((64, 64), (32, 32)),
    "coco": ((512, 512), (256, 256)),
    "cityscapes": ((1024, 2048), (512, 1024)),
    "davis": ((512, 1024), (256, 512)),
    "kitti_step": ((384, 1248), (192, 624)),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_sizes(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config_lib.input_sizes(config.input) == SHIPPED_SIZES[name]


@pytest.mark.parametrize(
    "value,expected",
    [(64, (64, 64)), ((32, 64), (32, 64)), ([48, 16], (48, 16)),
     (np.int64(8), (8, 8)), (np.array([4, 12]), (4, 12))],
)
def test_size_hw_accepts_an_int_or_a_pair(value, expected):
  hw = config_lib.size_hw(value, "config.input.image_size")
  assert hw == expected and all(type(v) is int for v in hw)


@pytest.mark.parametrize(
    "value", [0, -8, True, 64.0, "64", "(32,64)", None, (32,), (8, 16, 32),
              (32, 0), (32, -4), (32.0, 64), (True, 4), {32: 64}],
)
def test_size_hw_rejects_anything_else_naming_the_field(value):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.size_hw(value, "config.input.mask_size")
  assert str(e.value) == (
      f"config.input.mask_size={value!r}: expected a positive integer (a "
      "square) or a (height, width) pair of positive integers")


@pytest.mark.parametrize(
    "image,mask,field,message",
    [
        # Image not a multiple of 16 on the width only.
        ((32, 72), (32, 72), "input.image_size",
         "a width that is a multiple of 16 (the ResNet's output stride), "
         "got 72"),
        # Mask does not divide the image on the width.
        ((32, 64), (16, 24), "input.mask_size",
         "the width 24 does not divide 64"),
        # Stride 8 on the height.
        ((64, 64), (8, 32), "input.mask_size",
         "image_size / mask_size in (1, 2, 4) on the height, got 64 / 8 = 8"),
        # Stride 2 on the height, 4 on the width.
        ((32, 64), (16, 16), "input.mask_size",
         "the same image_size / mask_size stride on both axes (square mask "
         "pixels), got 2 on the height and 4 on the width"),
        # Width 12 of the mask is not divisible by 2**3 (paper decoder).
        ((64, 48), (16, 12), "input.mask_size",
         "a width divisible by 2**(len(model.dec_dim_mults)-1) = 8, got 12"),
        ((32, 64, 96), (16, 32), "input.image_size",
         "expected a positive integer (a square) or a (height, width) pair"),
    ],
)
def test_validate_checks_each_axis_and_names_it(image, mask, field, message):
  config = _synthetic()
  config.model.dec_dim_mults = (1, 1, 2, 2)  # Masks divisible by 8.
  config.input.image_size, config.input.mask_size = image, mask
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value)
  assert str(e.value).startswith(f"config.{field}=")


def test_validate_accepts_a_rectangle():
  config = _synthetic()
  config.input.image_size, config.input.mask_size = (32, 64), (16, 32)
  config_lib.validate(config)
  # Lists (a config read back from JSON) and a pair with an int mask.
  config.input.image_size, config.input.mask_size = [64, 32], [32, 16]
  config_lib.validate(config)


def _synthetic():
  return importlib.import_module("configs.synthetic").get_config()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("input.mask_size", 24, "a divisor of input.image_size=64"),
        ("input.max_instances", 300, "max_instances=300"),
        ("input.num_classes", 257, "num_classes=257"),
        ("diffusion.schedule", "cosin", "one of"),
        ("diffusion.softmax_groups", 3, "softmax_groups=3"),
        ("diffusion.sample_steps", 0, "sample_steps=0"),
        ("diffusion.instance_bit_scale", 0.0, "instance_bit_scale=0.0"),
        ("model.conditional", "attn", "model.conditional='attn'"),
        ("model.matmul_precision", "fp8", "'bfloat16'"),
        ("optax.end_lr_factor", 2.0, "end_lr_factor=2.0"),
    ],
)
def test_validate_names_field_and_expectation(field, value, message):
  config = _synthetic()
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value)
  assert f"config.{field}" in str(e.value)


def _parse_cli(monkeypatch, *overrides):
  """The tiny config as the entry points' flag parses it.

  A locked config file with `--config.*` overrides (ml_collections reads
  the overrides from sys.argv).
  """
  from absl import flags
  from ml_collections import config_flags

  argv = ["prog", "--config=configs/synthetic.py:tiny", *overrides]
  monkeypatch.setattr("sys.argv", argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize(
    "overrides,image,mask",
    [
        (["--config.input.image_size=64"], 64, 16),
        (["--config.input.image_size=(32,64)",
          "--config.input.mask_size=16,32"], (32, 64), (16, 32)),
        (["--config.input.image_size=[48, 96]",
          "--config.input.mask_size=(24,48)"], [48, 96], (24, 48)),
    ],
)
def test_command_line_sizes_parse_as_int_or_pair(monkeypatch, overrides,
                                                  image, mask):
  config = _parse_cli(monkeypatch, *overrides)
  assert (config.input.image_size, config.input.mask_size) == (image, mask)
  config_lib.validate(config)
  assert config_lib.input_sizes(config.input) == (
      config_lib.size_hw(image), config_lib.size_hw(mask))


def test_locked_config_rejects_unknown_field():
  config = _synthetic()
  config.lock()
  with pytest.raises(AttributeError):
    config.input.batchsize = 3


def test_coco_stages_and_bad_stage():
  coco = importlib.import_module("configs.coco")
  low, high = coco.get_config("stage=low_res"), coco.get_config(
      "stage=high_res")
  assert (low.input.image_size, low.input.mask_size) == (512, 256)
  assert (high.input.image_size, high.input.mask_size) == (1024, 512)
  assert high.optax.lr == 1e-5 and low.input.batch_size == 512
  with pytest.raises(config_lib.ConfigError, match="stage='mid'"):
    coco.get_config("stage=mid")


def test_synthetic_long_only_trains_longer():
  synthetic = importlib.import_module("configs.synthetic")
  default, long = synthetic.get_config(), synthetic.get_config("long")
  assert long.total_steps == 2 * default.total_steps == 4800
  video, video_long = (synthetic.get_config("video"),
                       synthetic.get_config("video,long"))
  assert video_long.total_steps == 2 * video.total_steps
  for a, b in ((default, long), (video, video_long)):
    a, b = a.to_dict(), b.to_dict()
    for key in ("total_steps", "ckpt_steps"):
      a.pop(key), b.pop(key)
    assert a == b


def check_rectangular_forward(exp, name: str) -> None:
  """Traces the model at config `name`'s (height, width) (no compile).

  jax.eval_shape of encode and decode with the experiment's abstract
  weights: encoder tokens on the stride-16 grid, features and decoder
  logits at the mask size, batch shapes at the config's sizes. Weights of
  other shapes than the rectangle needs would fail the trace.
  """
  import jax

  from pix2seq_d_jax.diffusion import losses

  config = exp.config
  (h, w), (mh, mw) = SHIPPED_SIZES[name]
  spec = exp.batch_spec(1)
  assert spec["image"].shape == (1, h, w, 3)
  assert spec["semantic"].shape == spec["loss_weight"].shape == (1, mh, mw)
  if exp.is_video:  # Two conditioning frames' masks.
    assert spec["cond_semantic"].shape == (1, 2, mh, mw)
  model, state = exp.model, exp.abstract_state
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  bits = 2 * config.diffusion.bits_per_channel
  x_t = jax.ShapeDtypeStruct((1, mh, mw, bits), "float32")
  gamma = jax.ShapeDtypeStruct((1,), "float32")
  cond = None
  if model.cond_channels:
    cond = jax.ShapeDtypeStruct((1, mh, mw, model.cond_channels), "float32")
  encoded = jax.eval_shape(
      lambda v, im: model.apply(v, im, train=False, method="encode"),
      variables, spec["image"])
  assert encoded["tokens"].shape == (1, (h // 16) * (w // 16), 512)
  assert encoded["features"].shape == (1, mh, mw, 256)
  out = jax.eval_shape(
      lambda v, x, g, e, c: model.apply(v, x, g, e, cond_map=c, train=False,
                                        method="decode"),
      variables, x_t, gamma, encoded, cond)
  outputs = losses.num_output_channels(
      config.diffusion.loss_type, bits, config.diffusion.softmax_groups)
  assert out.shape == (1, mh, mw, outputs)


@pytest.mark.parametrize("name", ["coco", "cityscapes", "davis"])
def test_paper_configs_build_the_94_5m_model(name):
  from clu import parameter_overview

  from pix2seq_d_jax import experiment

  config = importlib.import_module(f"configs.{name}").get_config()
  # Abstract only (jax.eval_shape): nothing of the 94.5M model is allocated.
  exp = experiment.create(config, total_steps=10)
  abstract = exp.abstract_state
  count = parameter_overview.count_parameters(abstract.params)
  assert abs(count - 94.5e6) / 94.5e6 < 0.02, count
  if name == "davis":  # Conditioning on 2 earlier frames' 16 bits each.
    conv_in = abstract.params["decoder"]["conv_in"]["kernel"]
    assert conv_in.shape[2] == 16 + 256 + 32
  # The shipped rectangles (KITTI-STEP's in test_kitti_step).
  check_rectangular_forward(exp, name)


def test_stuff_identity_cli_sets_target_and_eval_and_bad_values(monkeypatch):
  config = _parse_cli(monkeypatch, "--config.input.stuff_identity=random")
  # One shared value: the training target and the post-processing.
  assert config.input.stuff_identity == "random"
  assert config.evals.panoptic.stuff_identity == "random"
  config_lib.validate(config)

  config = _synthetic()
  config.input.stuff_identity = "stuff"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert str(e.value) == (
      "config.input.stuff_identity='stuff': expected one of "
      "['random', 'zero']")
  config = _synthetic()
  config.evals.panoptic = ml_collections.ConfigDict(
      dict(type="coco_panoptic", stuff_identity="random"))
  config.input.stuff_identity = "zero"
  with pytest.raises(config_lib.ConfigError,
                     match=r"evals.panoptic.stuff_identity='random'"):
    config_lib.validate(config)


def test_shipped_configs_stuff_identity():
  # The reference's value per dataset: random ids for COCO and Cityscapes
  # stuff; DAVIS background and KITTI-STEP stuff keep id 0 there.
  expected = {"coco": "random", "cityscapes": "random", "davis": "zero",
              "kitti_step": "zero"}
  for name, value in expected.items():
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.input.stuff_identity == value, name
    if "panoptic" in config.evals:
      assert config.evals.panoptic.stuff_identity == value, name
    # Training builds its targets with the same rule that scores them.
    from pix2seq_d_jax import experiment

    fn = experiment.train_preprocess_fn(config)
    assert fn.keywords["stuff_identity"] == value, name


def test_scan_layers_must_be_a_bool():
  config = _synthetic()
  config_lib.validate(config)
  del config.model["scan_layers"]  # The field's type is bool: retyped.
  config.model.scan_layers = "yes"
  with pytest.raises(config_lib.ConfigError, match="config.model.scan_layers"):
    config_lib.validate(config)


def test_with_overrides_converts_to_each_fields_type_and_copies():
  config = ml_collections.ConfigDict({
      "flag": False, "count": 3, "rate": 0.5, "name": "a",
      "size": (1, 2), "steps": [1, 2], "unset": None,
      "group": {"inner": 1}})
  changed = config_lib.with_overrides(
      config, ["flag=true", "count=7", "rate=1e-3", "name=b",
               "size=(3, 4)", "steps=[5]", "unset=(8, 8)",
               "group.inner=2"], flag="--alternate")
  assert changed.to_dict() == {
      "flag": True, "count": 7, "rate": 1e-3, "name": "b", "size": (3, 4),
      "steps": [5], "unset": (8, 8), "group": {"inner": 2}}
  # The original is untouched; a None field also takes plain text.
  assert config.count == 3 and config.group.inner == 1
  assert config_lib.with_overrides(config, ["unset=eigen"],
                                   flag="--x").unset == "eigen"
  for item, message in (
      ("count", "expected field=value"),
      ("missing=1", "the config has no field missing"),
      ("group.missing.x=1", "the config has no field group.missing.x"),
      ("group=1", "group is a group of fields"),
      ("count=many", "expected a value of type int for count, e.g. 3"),
      ("flag=maybe", "expected a value of type bool for flag"),
      ("size=7", "expected a tuple literal for size, e.g. \\(1, 2\\)"),
      ("size=(1", "expected a tuple literal for size"),
  ):
    with pytest.raises(config_lib.ConfigError,
                       match=f"--alternate={re.escape(item)}: {message}"):
      config_lib.with_overrides(config, [item], flag="--alternate")
