"""Config helpers: config-string parsing, durations to steps, validation.

Configs are `ml_collections.ConfigDict`s returned by `get_config(arg)` in
`configs/*.py`. This module holds the three things every config and the trainer
share: `parse_arg` for the string after the colon in
`--config=configs/x.py:a=1,flag`, `steps` for `<name>_steps|_epochs|_examples|
_percent` durations, and `validate`, which checks the whole config before
anything is built so that a bad value fails with one line naming the field.
"""

from __future__ import annotations

import ast
import copy
import numbers
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags

from pix2seq_d_jax import xla_env


class ConfigError(ValueError):
  """A config field has a value the framework cannot use."""


# `config.input.stuff_identity`: the instance id of stuff segments in the
# training target and how post-processing builds segments. 'random' (the
# reference): every segment, stuff included, gets its own random id and each
# predicted id votes for one class over all its pixels; 'zero': stuff keeps
# id 0, one segment per stuff class, ids vote among thing pixels only.
STUFF_IDENTITIES = ("random", "zero")
# The value `configs/common.py` sets, the default of the functions that take
# the switch: 'zero' scored PQ 0.603 against 0.151 for 'random' on the
# synthetic default job (numbers in configs/common.py and README.md).
STUFF_IDENTITY_DEFAULT = "zero"
# `config.init_prng_impl`: the random-number generators (jax's names) the
# state's initialisation may draw with (`train_state.make_init_fn`).
INIT_PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# The value `configs/common.py` sets, and what a config without the field
# (one saved by an earlier version) means.
INIT_PRNG_IMPL_DEFAULT = "unsafe_rbg"


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `a=1,b=x,flag` into a ConfigDict typed by `defaults`.

  A bare word `flag` sets a boolean default to True. Values are converted to
  the type of their default (int, float, str, bool). Unknown keys are rejected
  so that a typo in the command line fails instead of being ignored.

  Args:
    arg: the string after the colon of `--config=path.py:arg`, or None.
    **defaults: the known keys and their default values.

  Returns:
    A ConfigDict with every key of `defaults`.

  Raises:
    ConfigError: for an unknown key or a value that does not parse.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
          f"config argument {key!r} is unknown; expected one of "
          f"{sorted(defaults)}"
      )
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ConfigError(
            f"config argument {key!r} needs a value ({key}=...), "
            f"default is {default!r}"
        )
      result[key] = True
      continue
    result[key] = _convert(key, value.strip(), default)
  return result


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"config argument {key}={value!r}: expected a boolean")
  if isinstance(default, int | float):
    try:
      return type(default)(ast.literal_eval(value))
    except (ValueError, SyntaxError) as e:
      raise ConfigError(
          f"config argument {key}={value!r}: expected a value of type "
          f"{type(default).__name__}"
      ) from e
  return value


def _literal(text: str, default: Any) -> Any:
  """`text` as a Python literal, or `default` if it is none."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return default


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Sequence[str], *,
                   flag: str) -> ml_collections.ConfigDict:
  """A copy of `config` with `field=value` overrides applied.

  Each value is converted to the type of the field it replaces, as
  `--config.field=value` does: booleans, numbers, strings, and tuples or
  lists written as Python literals (`(256, 256)`); a field that holds None
  takes any literal, or the text itself.

  Args:
    config: the config to copy; it is not changed.
    overrides: `dotted.field=value` items.
    flag: the command-line flag they came from, for error messages.

  Returns:
    The changed copy (not validated).

  Raises:
    ConfigError: an item without `=`, a field the config does not have, or
      a value that does not parse as the field's type.
  """
  result = copy.deepcopy(config)
  groups = (Mapping, ml_collections.ConfigDict)
  for item in overrides:
    field, has_value, text = item.partition("=")
    field, text = field.strip(), text.strip()
    if not has_value or not field:
      raise ConfigError(f"{flag}={item}: expected field=value, e.g. "
                        "model.conv_impl=lax")
    *parents, name = field.split(".")
    node = result
    for part in parents:
      node = node.get(part) if isinstance(node, groups) else None
    if not isinstance(node, groups) or name not in node:
      raise ConfigError(f"{flag}={item}: the config has no field {field}")
    current = node[name]
    if isinstance(current, groups):
      raise ConfigError(f"{flag}={item}: {field} is a group of fields; "
                        "override one of them")
    if isinstance(current, bool | int | float):
      try:
        value = _convert(field, text, current)
      except (ConfigError, TypeError) as e:
        raise ConfigError(
            f"{flag}={item}: expected a value of type "
            f"{type(current).__name__} for {field}, e.g. {current!r}") from e
    elif isinstance(current, tuple | list):
      value = _literal(text, default=None)
      if not isinstance(value, tuple | list):
        raise ConfigError(
            f"{flag}={item}: expected a {type(current).__name__} literal "
            f"for {field}, e.g. {current!r}")
      value = type(current)(value)
    elif current is None:
      value = _literal(text, default=text)
    else:
      value = text
    node[name] = value
  return result


_DURATION_SUFFIXES = ("steps", "epochs", "examples", "percent")


def steps(
    prefix: str,
    config: Mapping[str, Any],
    *,
    data_size: int | None = None,
    batch_size: int | None = None,
    total_steps: int | None = None,
    default: Any = ValueError,
) -> int:
  """Turns `<prefix>_steps|_epochs|_examples|_percent` into a step count.

  Exactly one spelling may be set (a non-None value); two at once is an error,
  because it is ambiguous which one the user meant.

  Args:
    prefix: the duration's name, e.g. `total` or `log_training`.
    config: the ConfigDict (or mapping) that holds the duration.
    data_size: examples per epoch, needed for `_epochs`.
    batch_size: global batch size, needed for `_epochs` and `_examples`.
    total_steps: needed for `_percent`.
    default: returned when no spelling is set; raise if left as ValueError.

  Returns:
    The duration in steps (at least 1 for positive durations).

  Raises:
    ConfigError: two spellings set, none set without a default, or a
      quantity the conversion needs is missing.
  """
  set_keys = [
      f"{prefix}_{s}"
      for s in _DURATION_SUFFIXES
      if config.get(f"{prefix}_{s}") is not None
  ]
  if len(set_keys) > 1:
    raise ConfigError(
        f"config fields {set_keys} are all set; set only one of "
        f"{[f'{prefix}_{s}' for s in _DURATION_SUFFIXES]}"
    )
  if not set_keys:
    if default is ValueError:
      raise ConfigError(
          f"config needs one of "
          f"{[f'{prefix}_{s}' for s in _DURATION_SUFFIXES]}"
      )
    return default
  key = set_keys[0]
  value = config[key]
  suffix = key[len(prefix) + 1 :]
  if suffix == "steps":
    return int(value)
  if suffix == "percent":
    if total_steps is None:
      raise ConfigError(f"config field {key} needs the total step count")
    return max(1, int(round(value * total_steps / 100.0)))
  if batch_size is None:
    raise ConfigError(f"config field {key} needs the batch size")
  if suffix == "examples":
    return max(1, int(round(value / batch_size)))
  if data_size is None:
    raise ConfigError(f"config field {key} needs the dataset size")
  return max(1, int(round(value * data_size / batch_size)))


def size_hw(value: Any, field: str = "size") -> tuple[int, int]:
  """An image or mask size as (height, width): n -> (n, n), (h, w) as is.

  Sizes are given as one int (a square) or a (height, width) pair, in
  configs, on the command line and in function arguments; every reader
  normalises them here so that a bad value fails in one place.

  Args:
    value: a positive int, or a sequence (tuple, list, array) of two
      positive ints.
    field: the name reported in the error, e.g. `config.input.image_size`.

  Returns:
    (height, width) as Python ints.

  Raises:
    ConfigError: for anything else (bools, floats, strings, other lengths,
      non-positive sides).
  """

  def side(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
      return None
    return int(v) if v > 0 else None

  if (n := side(value)) is not None:
    return n, n
  if not isinstance(value, str | bytes | Mapping):
    try:
      sides = [side(v) for v in value]
    except TypeError:  # Not iterable (a float, None, a 0-d array).
      sides = []
    if len(sides) == 2 and None not in sides:
      return sides[0], sides[1]
  raise ConfigError(
      f"{field}={value!r}: expected a positive integer (a square) or a "
      "(height, width) pair of positive integers"
  )


def input_sizes(
    inp: Mapping[str, Any],
) -> tuple[tuple[int, int], tuple[int, int]]:
  """(image (h, w), mask (h, w)) of a `config.input`, via `size_hw`."""
  return (size_hw(inp["image_size"], "config.input.image_size"),
          size_hw(inp["mask_size"], "config.input.mask_size"))


def _require(cond: bool, field: str, value: Any, expected: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}={value!r}: expected {expected}")


# The `jax.default_matmul_precision` names `model.matmul_precision` may
# take: jax's precision levels and the float32-accumulating algorithms that
# XLA:CPU accepts ('bfloat16' and 'BF16_BF16_F32' give bfloat16 products).
MATMUL_PRECISIONS = ("default", "high", "highest", "float32",
                     "tensorfloat32", "bfloat16", "BF16_BF16_F32",
                     "F32_F32_F32")


def _check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
  _require(value in choices, field, value, f"one of {list(choices)}")


def _diffusion_choices() -> dict[str, tuple[str, ...]]:
  """The names each `config.diffusion` field may take, from their modules.

  Imported here, not at module level: parsing a config (main's flag parsing,
  before `jax.distributed.initialize`) then loads neither jax nor the
  diffusion package, which only validation needs.
  """
  from pix2seq_d_jax.diffusion import (
      analog_bits,
      losses,
      sampler,
      schedules,
  )

  return {
      "bit_code": analog_bits.BIT_CODES,
      "schedule": schedules.SCHEDULES,
      "loss_type": losses.LOSS_TYPES,
      "sampler": sampler.SAMPLERS,
  }


def _validate_sizes(inp: ml_collections.ConfigDict, levels: int) -> None:
  """Per-axis rules of `input.image_size` and `input.mask_size`.

  On each axis the mask divides the image with a stride in (1, 2, 4), the
  same stride on both axes (a mask pixel covers a square of image pixels,
  as in the reference; the crop-back assumes one scale), the mask is
  divisible by 2**levels (the U-Net's down-samplings) and the image by 16
  (the ResNet's output stride). Errors name the field and the axis.
  """
  image, mask = input_sizes(inp)
  strides = []
  for axis, s, m in zip(("height", "width"), image, mask, strict=True):
    _require(
        s % m == 0,
        "input.mask_size",
        inp.mask_size,
        f"a divisor of input.image_size={inp.image_size!r} on each axis; "
        f"the {axis} {m} does not divide {s}",
    )
    strides.append(s // m)
    _require(
        strides[-1] in (1, 2, 4),
        "input.mask_size",
        inp.mask_size,
        f"image_size / mask_size in (1, 2, 4) on the {axis}, got "
        f"{s} / {m} = {strides[-1]} (the pyramid merge produces stride-4 "
        "features at most)",
    )
    _require(
        m % (2**levels) == 0,
        "input.mask_size",
        inp.mask_size,
        f"a {axis} divisible by 2**(len(model.dec_dim_mults)-1) = "
        f"{2**levels}, got {m}",
    )
    _require(
        s % 16 == 0,
        "input.image_size",
        inp.image_size,
        f"a {axis} that is a multiple of 16 (the ResNet's output stride), "
        f"got {s}",
    )
  _require(
      strides[0] == strides[1],
      "input.mask_size",
      inp.mask_size,
      f"the same image_size / mask_size stride on both axes (square mask "
      f"pixels), got {strides[0]} on the height and {strides[1]} on the "
      "width",
  )


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config before anything is built.

  Catches the mistakes that otherwise surface as shape errors deep inside
  XLA: sizes that do not divide, bit budgets that cannot hold the labels,
  unknown names.

  Raises:
    ConfigError: naming the field, its value and what was expected.
  """
  inp, diff, model = config.input, config.diffusion, config.model
  _require(
      isinstance(inp.batch_size, int) and inp.batch_size > 0,
      "input.batch_size",
      inp.batch_size,
      "a positive integer",
  )
  _validate_sizes(inp, len(model.dec_dim_mults) - 1)
  bits = diff.bits_per_channel
  _require(
      1 <= bits <= 16, "diffusion.bits_per_channel", bits, "1..16"
  )
  frames = tuple(inp.get("proceeding_frames") or ())
  _require(
      all(isinstance(f, int) and f < 0 for f in frames)
      and len(set(frames)) == len(frames),
      "input.proceeding_frames",
      frames,
      "distinct negative frame offsets such as (-2, -1), or () for images",
  )
  _check_choice("input.stuff_identity",
                inp.get("stuff_identity", STUFF_IDENTITY_DEFAULT),
                STUFF_IDENTITIES)
  _require(
      0.0 <= inp.get("frames_dropout", 0.0) <= 1.0,
      "input.frames_dropout",
      inp.get("frames_dropout"),
      "a probability in [0, 1]",
  )
  later = diff.get("sample_steps_later")
  _require(
      later is None or (isinstance(later, int) and later >= 1),
      "diffusion.sample_steps_later",
      later,
      "None or an integer >= 1",
  )
  _require(
      2 <= inp.max_instances <= 2**bits,
      "input.max_instances",
      inp.max_instances,
      f"in [2, 2**diffusion.bits_per_channel = {2**bits}]",
  )
  if inp.get("num_classes") is not None:
    _require(
        inp.num_classes <= 2**bits,
        "input.num_classes",
        inp.num_classes,
        f"at most 2**diffusion.bits_per_channel = {2**bits} (classes incl. "
        "void must fit the semantic bits)",
    )
  _require(
      diff.bit_scale > 0, "diffusion.bit_scale", diff.bit_scale, "> 0"
  )
  instance_scale = diff.get("instance_bit_scale")
  _require(
      instance_scale is None or instance_scale > 0,
      "diffusion.instance_bit_scale", instance_scale,
      "> 0, or None (the instance bits use diffusion.bit_scale)",
  )
  for field, choices in _diffusion_choices().items():
    _check_choice(f"diffusion.{field}", diff[field], choices)
  num_bits = 2 * bits
  _require(
      diff.softmax_groups >= 1 and num_bits % diff.softmax_groups == 0,
      "diffusion.softmax_groups",
      diff.softmax_groups,
      f"a divisor of the {num_bits} label bits",
  )
  _require(
      num_bits // diff.softmax_groups <= 16,
      "diffusion.softmax_groups",
      diff.softmax_groups,
      "at most 16 bits per softmax group (2**16 logits)",
  )
  _require(
      diff.sample_steps >= 1,
      "diffusion.sample_steps",
      diff.sample_steps,
      ">= 1",
  )
  _require(diff.td >= 0, "diffusion.td", diff.td, ">= 0")
  _require(
      0.0 <= diff.self_cond_rate <= 1.0,
      "diffusion.self_cond_rate",
      diff.self_cond_rate,
      "in [0, 1]",
  )
  _require(
      diff.loss_weight_power >= 0,
      "diffusion.loss_weight_power",
      diff.loss_weight_power,
      ">= 0",
  )
  _require(
      isinstance(diff.get("eps_loss_weighted", False), bool)
      and (not diff.get("eps_loss_weighted") or diff.loss_type == "eps"),
      "diffusion.eps_loss_weighted",
      diff.get("eps_loss_weighted"),
      "a bool, True only with diffusion.loss_type='eps' (the other loss "
      "types are always weighted)",
  )
  _check_choice("model.conditional", model.conditional, ("cat", "cat+attn"))
  _check_choice("model.dtype", model.dtype, ("float32", "bfloat16"))
  if model.get("matmul_precision") is not None:
    _check_choice("model.matmul_precision", model.matmul_precision,
                  MATMUL_PRECISIONS)
  _check_choice("model.conv_impl", model.get("conv_impl", "auto"),
                ("auto", "lax", "tiled"))
  _check_choice("model.backbone_norm", model.backbone_norm, ("batch", "group"))
  scan_layers = model.get("scan_layers", False)
  _require(isinstance(scan_layers, bool), "model.scan_layers", scan_layers,
           "a bool")
  opt = config.optax
  _require(opt.lr > 0, "optax.lr", opt.lr, "> 0")
  _require(
      0.0 <= opt.end_lr_factor <= 1.0,
      "optax.end_lr_factor",
      opt.end_lr_factor,
      "in [0, 1]",
  )
  _require(
      0.0 <= config.ema_decay < 1.0, "ema_decay", config.ema_decay, "in [0, 1)"
  )
  ema_every = config.get("ema_every_steps", 1)
  _require(type(ema_every) is int and ema_every >= 1, "ema_every_steps",
           ema_every, "an int >= 1")
  _check_choice("remat", config.remat, ("none", "encoder", "decoder", "both",
                                        "blocks", "blocks_dots"))
  _check_choice("cpu_scheduler", config.get("cpu_scheduler", "memory"),
                xla_env.CPU_SCHEDULERS)
  _check_choice("cpu_convolutions", config.get("cpu_convolutions", "eigen"),
                xla_env.CPU_CONVOLUTIONS)
  _check_choice("init_prng_impl",
                config.get("init_prng_impl", INIT_PRNG_IMPL_DEFAULT),
                INIT_PRNG_IMPLS)
  reuse = config.get("reuse_host_memory", True)
  _require(isinstance(reuse, bool), "reuse_host_memory", reuse, "a bool")
  keep_trace = config.get("trace_cache", True)
  _require(isinstance(keep_trace, bool), "trace_cache", keep_trace, "a bool")
  _require(
      config.grad_accum_steps >= 1
      and inp.batch_size % config.grad_accum_steps == 0,
      "grad_accum_steps",
      config.grad_accum_steps,
      f">= 1 and dividing input.batch_size={inp.batch_size}",
  )
  for name, ev in config.evals.items():
    _require(
        ev.get("type") is not None, f"evals.{name}.type", None, "a name"
    )
    if "crowd" in ev:
      _check_choice(f"evals.{name}.crowd", ev.crowd, ("last", "merge"))
    if "stuff_identity" in ev:
      _require(
          ev.stuff_identity
          == inp.get("stuff_identity", STUFF_IDENTITY_DEFAULT),
          f"evals.{name}.stuff_identity", ev.stuff_identity,
          f"config.input.stuff_identity={inp.get('stuff_identity')!r} "
          "(post-processing follows the training target's convention; set "
          "config.input.stuff_identity, which the eval field shares)")
  _require(
      len(config.mesh) >= 1 and all(len(a) == 2 for a in config.mesh),
      "mesh",
      config.mesh,
      "a list of (axis_name, size) pairs",
  )


# The folder holding `configs/` and `pix2seq_d_jax/` (the checkout, or
# site-packages for a regular install, where `configs` is a package too).
CHECKOUT_ROOT = os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))
)


def resolve_config_path(path: str) -> str:
  """Finds a config file given relative to the cwd or to the checkout.

  The default `--config=configs/synthetic.py` is relative, so a run started
  outside the repository root would otherwise fail to find it.

  Args:
    path: the part of `--config` before the colon.

  Returns:
    `path` itself if it exists, else the checkout's file of that name.

  Raises:
    ConfigError: if the path is empty or the file is in neither place.
  """
  if not path:
    raise ConfigError(
        "--config is empty; expected a config file such as "
        "configs/synthetic.py"
    )
  expanded = os.path.expanduser(path)
  if os.path.isfile(expanded):
    return path
  tried = [os.path.abspath(expanded)]
  if not os.path.isabs(expanded):
    candidate = os.path.join(CHECKOUT_ROOT, expanded)
    if os.path.isfile(candidate):
      return candidate
    if candidate != tried[0]:
      tried.append(candidate)
  raise ConfigError(
      f"--config={path}: config file not found (tried "
      f"{' and '.join(tried)}); expected e.g. configs/synthetic.py"
  )


def _resolve_config_args(
    argv: list[str], default_config: str | None
) -> list[str]:
  """`argv` with each `--config=FILE[:ARGS]` resolved by resolve_config_path.

  Missing files are found here, before ml_collections defers the failure to
  the first access of the config as a multi-line IOError. Without a
  `--config`, `--config=<default_config>` is inserted first (before any
  `--config.<field>` override, as ml_collections requires).
  """
  argv = list(argv)
  given = any(a.partition("=")[0] in ("--config", "-config") for a in argv)
  if default_config and not given:
    argv.insert(1, f"--config={default_config}")
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name not in ("--config", "-config"):
      continue
    if not eq:  # `--config FILE`: the value is the next argument.
      if i + 1 >= len(argv):
        continue
      i, value = i + 1, argv[i + 1]
    path, colon, rest = value.partition(":")
    resolved = resolve_config_path(path)
    argv[i] = (f"{name}=" if eq else "") + resolved + colon + rest
  return argv


def _flag_error_line(e: flags.Error) -> str:
  """One line for an absl flag error.

  ml_collections wraps an exception of `get_config` (a bad `:variant`) in a
  message that holds the whole traceback; only its last line, the
  exception's own message, says what is wrong.
  """
  text = str(e)
  marker = "Error whilst parsing config file:"
  if marker not in text:
    return " ".join(text.split())
  head = text.split(marker, 1)[0].strip().rstrip(":")
  last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
  # "package.module.ConfigError: message" -> "message".
  kind, sep, message = last.partition(": ")
  if sep and " " not in kind:
    last = message
  return f"{head}: {last}"


def parse_flags(
    argv: list[str], default_config: str | None = None
) -> list[str]:
  """absl flag parsing for the CLIs; bad flags and configs fail in one line.

  Used as `app.run(main, flags_parser=parse_flags)`: a missing config file
  (a relative one is also looked up in the checkout), a bad `:variant`, an
  unknown or mistyped `--config.<field>` override of the locked config, or a
  bad flag value prints one `error: ...` line and exits with status 2
  instead of a stack trace.

  Args:
    argv: the command line.
    default_config: `--config` value used when none is given.

  Returns:
    The remaining (non-flag) arguments.
  """
  try:
    return flags.FLAGS(_resolve_config_args(argv, default_config))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
  except flags.Error as e:
    print(f"error: {_flag_error_line(e)}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for an unknown or mistyped
    # --config.<field> override of the locked config.
    overrides = [a for a in argv if a.startswith("--config.")]
    print(
        f"error: bad config override among {overrides}: "
        f"{type(e).__name__}: {e} (the field must exist in the config; "
        "see configs/common.py for the schema)",
        file=sys.stderr,
    )
  sys.exit(2)
