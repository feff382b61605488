"""Tests of config parsing, durations and validation, and shipped configs."""

import importlib

import ml_collections
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
        ("model.conditional", "attn", "model.conditional='attn'"),
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


@pytest.mark.parametrize("name", ["coco", "cityscapes", "davis"])
def test_paper_configs_build_the_94_5m_model(name):
  from clu import parameter_overview

  from pix2seq_d_jax import experiment

  config = importlib.import_module(f"configs.{name}").get_config()
  # Abstract only (jax.eval_shape): nothing of the 94.5M model is allocated.
  abstract = experiment.create(config, total_steps=10).abstract_state
  count = parameter_overview.count_parameters(abstract.params)
  assert abs(count - 94.5e6) / 94.5e6 < 0.02, count
  if name == "davis":  # Conditioning on 2 earlier frames' 16 bits each.
    conv_in = abstract.params["decoder"]["conv_in"]["kernel"]
    assert conv_in.shape[2] == 16 + 256 + 32
