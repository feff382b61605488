r"""How instances form during sampling: splits and merges at every step.

  python -m pix2seq_d_jax.instance_study --config=configs/synthetic.py \
      --workdir=/tmp/p2sd [--max_images=100] [--output=/tmp/study.json] \
      [--part=0.2] [--min_pixels=N] \
      [--config.diffusion.sample_steps=50 --config.diffusion.td=49 ...]

The EMA weights of the latest checkpoint in `--workdir` sample the first
`--max_images` images of the config's eval split with the image sampler
(the sampler setting is the config's: `diffusion.sample_steps`, `td`,
`self_cond`, `sampler`, ... as overridden on the command line). The x0
estimate of every step is decoded into (semantic, instance) maps and
compared with the ground truth; one table row per step and a `final` row
(the sampler's returned prediction, which the panoptic evaluator scores;
it equals the last step) are printed, then a summary of how splits and
merges come and go. `--output` writes the same numbers as JSON. Batches,
batch size (`config.evals.panoptic.batch_size`) and sampling keys
(`fold_in(key(config.seed), batch index)`) are the panoptic evaluator's,
so the final row describes the very masks an in-training eval scores.

Measurements, at mask resolution, on real rows only (padding rows of the
last batch are dropped; padded pixels are void in the ground truth):

* GT thing segment G: a (class, instance id) pair of the ground truth
  with a thing class and instance id > 0 (crowd and stuff pixels have id
  0) covering at least `min_pixels` pixels. `--min_pixels` is in mask
  pixels; by default `config.evals.panoptic.min_pixels` (original pixels)
  times the mask / image area ratio of the config's sizes, rounded, at
  least 1 (16 * (32 / 64)^2 = 4 for configs/synthetic.py). Smaller things
  are not counted anywhere below.
* The id vote of G at step s: the predicted instance ids of G's pixels
  whose predicted class is G's class; id 0 and pixels of another
  predicted class are left out. An id covers G when it has at least
  `--part` (default 0.2) of G's pixels (all of them, voting or not).
* `ids_per_thing`: number of ids covering G (0 when no pixel votes).
* `split`: G has >= 2 covering ids.
* `merged`: G's dominant id (most votes; ties go to the smaller id) is
  also the dominant id of another counted GT thing of the same class in
  the same image. A G without votes has no dominant id and is never
  merged.
* `class_acc`: fraction of G's pixels whose predicted class is G's.
* `semantic_acc`: fraction of labelled (non-void) ground-truth pixels with
  the right predicted class.
* `instance_change`: fraction of the pixels of counted GT things whose
  predicted instance id differs from the previous step's (0 at step 0;
  for the final row, against the last step).
* `split_new` / `split_gone`: fraction of GT things split at this step
  but not at the previous one / split at the previous one but not at
  this one (at step 0 every split thing is new).

Per step, split, merged, split_new and split_gone are fractions of all GT
things and ids_per_thing and class_acc means over them, pooled over the
images; semantic_acc and instance_change are pooled over pixels. `t` is
the time the decoder is told at that step, 1 - s / steps (with `td` > 0
the state it gets is less noisy than that). The summary counts per GT
thing: split (merged) at any step, at the final prediction, and `resolved`
(split, or merged, at some step but not at the end); `split_onset` is
the mean step from which the things split at the end stay split.

Errors of the user's making print one `error: ...` line and exit with
status 2. Nothing is written into the workdir (no compilation cache).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from pix2seq_d_jax import config_lib, experiment, reporting, sharding
from pix2seq_d_jax.data import pipeline
from pix2seq_d_jax.diffusion import analog_bits
from pix2seq_d_jax.formats import atomic
from pix2seq_d_jax.inference import predictor as predictor_lib

DEFAULT_PART = 0.2
DEFAULT_MAX_IMAGES = 100
# Size rule of configs without a panoptic eval (the Predictor's default).
_DEFAULT_MIN_ORIGINAL_PIXELS = 40
# Per-step columns of the table and of the JSON rows, in order.
COLUMNS = ("split", "split_new", "split_gone", "merged", "ids_per_thing",
           "class_acc", "semantic_acc", "instance_change")


def check_args(*, max_images: Any, part: Any, min_pixels: Any) -> None:
  """Raises ConfigError naming the flag when a study option is invalid.

  Args:
    max_images: images to study, an int >= 1.
    part: coverage of a thing that counts an id, 0 < part <= 0.5 (above
      0.5 no two ids can both cover a thing, so nothing could be split).
    min_pixels: smallest counted thing in mask pixels, an int >= 1, or None
      (derived from the config, `mask_min_pixels`).
  """
  if isinstance(max_images, bool) or not isinstance(max_images, int) or (
      max_images < 1):
    raise config_lib.ConfigError(
        f"--max_images={max_images!r}: expected a positive integer (the "
        "number of eval images to study)"
    )
  if isinstance(part, bool) or not isinstance(part, (int, float)) or not (
      0 < part <= 0.5):
    raise config_lib.ConfigError(
        f"--part={part!r}: expected 0 < part <= 0.5 (the fraction of a "
        "thing's pixels an id must cover; a split needs two such ids)"
    )
  if min_pixels is not None and (
      isinstance(min_pixels, bool) or not isinstance(min_pixels, int)
      or min_pixels < 1):
    raise config_lib.ConfigError(
        f"--min_pixels={min_pixels!r}: expected a positive integer (mask "
        "pixels), or leave it unset to derive it from "
        "config.evals.panoptic.min_pixels"
    )


def mask_min_pixels(config: ml_collections.ConfigDict) -> int:
  """The eval's size rule in mask pixels: the study's default.

  `config.evals.panoptic.min_pixels` counts original pixels; scaled by the
  mask / image area ratio of the config's sizes (exact for images at the
  input size), rounded, at least 1.
  """
  panoptic_eval = config.evals.get("panoptic")
  original = (panoptic_eval.min_pixels if panoptic_eval is not None
              else _DEFAULT_MIN_ORIGINAL_PIXELS)
  (ih, iw), (mh, mw) = config_lib.input_sizes(config.input)
  return max(1, int(round(original * (mh * mw) / (ih * iw))))


def segment_stats(
    gt_semantic: np.ndarray,
    gt_instance: np.ndarray,
    pred_semantic: np.ndarray,
    pred_instance: np.ndarray,
    *,
    is_thing: np.ndarray,
    min_pixels: int,
    part: float,
    prev_instance: np.ndarray | None = None,
) -> dict[str, Any]:
  """Split / merge statistics of one image's prediction (module docstring).

  Args:
    gt_semantic, gt_instance: int [h, w] ground truth (0 = void / no id).
    pred_semantic, pred_instance: int [h, w] one step's decoded maps.
    is_thing: bool [num_classes], indexed by class.
    min_pixels: smallest counted GT thing, in pixels of these maps.
    part: fraction of a thing's pixels an id must have to cover it.
    prev_instance: int [h, w] the previous step's instance map, or None
      (step 0: no change counted).

  Returns:
    Per counted GT thing, ordered by (class, instance id): `classes`,
    `pixels` (int [n]), `split`, `merged` (bool [n]), `ids_per_thing`
    (int [n]), `class_acc` (float [n]); pixel counts `labelled_pixels`,
    `semantic_correct`, `thing_pixels`, `instance_changed` (0 without
    `prev_instance`).

  Raises:
    ValueError: maps of different shapes or not 2-D, or a ground-truth
      class outside `is_thing`.
  """
  maps = [np.asarray(x) for x in (gt_semantic, gt_instance, pred_semantic,
                                  pred_instance)]
  if prev_instance is not None:
    maps.append(np.asarray(prev_instance))
  if maps[0].ndim != 2 or any(m.shape != maps[0].shape for m in maps):
    raise ValueError(
        "segment_stats: expected 2-D maps of one shape, got "
        f"{[m.shape for m in maps]}")
  gt_sem, gt_inst, pred_sem, pred_inst = (
      m.astype(np.int64) for m in maps[:4])
  is_thing = np.asarray(is_thing, bool)
  if gt_sem.size and (gt_sem.min() < 0 or gt_sem.max() >= len(is_thing)):
    raise ValueError(
        f"segment_stats: ground-truth classes {gt_sem.min()}.."
        f"{gt_sem.max()} outside is_thing's {len(is_thing)} classes")

  thing_px = is_thing[gt_sem] & (gt_inst > 0)
  key = gt_sem * (int(gt_inst.max(initial=0)) + 1) + gt_inst
  keys, counts = np.unique(key[thing_px], return_counts=True)
  kept = counts >= min_pixels
  keys, pixels = keys[kept], counts[kept]
  n = len(keys)
  # Segment index of every pixel, -1 outside counted things.
  seg = np.full(key.shape, -1, np.int64)
  member = thing_px & np.isin(key, keys)
  seg[member] = np.searchsorted(keys, key[member])
  classes = keys // (int(gt_inst.max(initial=0)) + 1)

  vote = member & (pred_sem == gt_sem) & (pred_inst > 0)
  num_ids = int(pred_inst.max(initial=0)) + 1
  votes = np.bincount(seg[vote] * num_ids + pred_inst[vote],
                      minlength=n * num_ids).reshape(n, num_ids)
  # The tolerance keeps an exact share (3 of 15 at part 0.2) covering.
  covering = votes >= part * pixels[:, None] - 1e-9
  covering[:, 0] = False
  ids_per_thing = covering.sum(axis=1)
  has_votes = votes.sum(axis=1) > 0
  dominant = np.where(has_votes, votes.argmax(axis=1), -1)
  same = ((classes[:, None] == classes[None, :])
          & (dominant[:, None] == dominant[None, :])
          & has_votes[:, None] & ~np.eye(n, dtype=bool))
  correct_class = np.bincount(
      seg[member & (pred_sem == gt_sem)], minlength=n)

  labelled = gt_sem > 0
  changed = 0
  if prev_instance is not None:
    prev = maps[4].astype(np.int64)
    changed = int((member & (pred_inst != prev)).sum())
  return {
      "classes": classes,
      "pixels": pixels,
      "split": ids_per_thing >= 2,
      "merged": same.any(axis=1),
      "ids_per_thing": ids_per_thing,
      "class_acc": correct_class / np.maximum(pixels, 1),
      "labelled_pixels": int(labelled.sum()),
      "semantic_correct": int((labelled & (pred_sem == gt_sem)).sum()),
      "thing_pixels": int(member.sum()),
      "instance_changed": changed,
  }


def _mean(x: np.ndarray) -> float | None:
  return float(np.mean(x)) if len(x) else None


def _ratio(num: int, den: int) -> float | None:
  return num / den if den else None


def summarize_step(
    per_image: Sequence[dict[str, Any]],
    prev_split: np.ndarray | None = None,
) -> dict[str, Any]:
  """Pools `segment_stats` of the images at one step into a table row.

  Args:
    per_image: the step's `segment_stats`, one per image.
    prev_split: bool [things] the previous step's `split`, concatenated in
      the same image order, or None at the first step.

  Returns:
    `things` and the `COLUMNS` (None where nothing is counted), plus
    `split_flags` / `merged_flags`: bool [things] for the next step.
  """
  split = np.concatenate([s["split"] for s in per_image]).astype(bool)
  merged = np.concatenate([s["merged"] for s in per_image]).astype(bool)
  before = np.zeros_like(split) if prev_split is None else prev_split
  total = {k: sum(s[k] for s in per_image) for k in (
      "labelled_pixels", "semantic_correct", "thing_pixels",
      "instance_changed")}
  return {
      "things": len(split),
      "split": _mean(split),
      "split_new": _mean(split & ~before),
      "split_gone": _mean(~split & before),
      "merged": _mean(merged),
      "ids_per_thing": _mean(np.concatenate(
          [s["ids_per_thing"] for s in per_image])),
      "class_acc": _mean(np.concatenate(
          [s["class_acc"] for s in per_image])),
      "semantic_acc": _ratio(total["semantic_correct"],
                             total["labelled_pixels"]),
      "instance_change": _ratio(total["instance_changed"],
                                total["thing_pixels"]),
      "split_flags": split,
      "merged_flags": merged,
  }


def track_things(split: np.ndarray, merged: np.ndarray) -> dict[str, Any]:
  """Per-thing history over the steps: when splits and merges come and go.

  Args:
    split, merged: bool [steps, things], the last row the final prediction.

  Returns:
    Fractions of GT things split (merged) at any step (`*_any`), at the
    end (`*_final`) and at some step but not at the end (`*_resolved`);
    `split_onset`: mean first step of the unbroken run of split steps that
    ends the trajectory, over the things split at the end (None if none).
  """
  out: dict[str, Any] = {"things": int(split.shape[1])}
  for name, flags_ in (("split", split), ("merged", merged)):
    ever = flags_.any(axis=0)
    out[f"{name}_any"] = _mean(ever)
    out[f"{name}_final"] = _mean(flags_[-1])
    out[f"{name}_resolved"] = _mean(ever & ~flags_[-1])
  final = split[:, split[-1]]
  # Steps counted back from the end until the first unsplit step.
  run = np.where(final.all(axis=0), len(split),
                 np.argmin(final[::-1], axis=0))
  out["split_onset"] = _mean(len(split) - run)
  return out


def _step_sampler(exp: experiment.Experiment, num_classes: int) -> Any:
  """Jitted `(params, batch_stats, images, rng) -> (semantic, instance,
  step_semantic, step_instance)`; the step maps are [b, steps, h, w]."""
  d = exp.config.diffusion
  predict = exp.predict_fn(num_classes, return_trajectory=True)

  def fn(params, batch_stats, image, rng):
    semantic, instance, trajectory = predict(params, batch_stats, image, rng)
    steps_sem, steps_inst = analog_bits.analog_bits_to_mask(
        trajectory["x0"], bits_per_channel=d.bits_per_channel,
        num_classes=num_classes,
        max_instances=exp.config.input.max_instances, code=d.bit_code)
    # [steps, b, ...] -> [b, steps, ...]: batch-sharded like the images.
    return (semantic, instance, steps_sem.swapaxes(0, 1),
            steps_inst.swapaxes(0, 1))

  batch = exp.batch_sharding
  return jax.jit(
      sharding.with_activation_rules(fn, exp.mesh,
                                     exp.config.sharding_rules),
      in_shardings=(exp.state_shardings.ema_params,
                    exp.state_shardings.batch_stats, batch, exp.replicated),
      out_shardings=batch,
  )


def study(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    part: float = DEFAULT_PART,
    min_pixels: int | None = None,
) -> dict[str, Any]:
  """Samples the eval split with the trajectory on and measures every step.

  Args:
    config: the training config, sampler overrides applied.
    workdir: the run's workdir (its latest checkpoint is used), its
      `checkpoints/` folder or a step folder.
    max_images: the first n images of `config.input.eval_split`.
    part: see `check_args`.
    min_pixels: smallest counted GT thing in mask pixels; None =
      `mask_min_pixels(config)`.

  Returns:
    {'setting': ..., 'steps': [row per step], 'final': row, 'summary':
    `track_things`}; a row holds `step`, `t`, `things` and the `COLUMNS`.

  Raises:
    ConfigError: a bad option or config, or a video (frame-conditioned)
      config.
    FileNotFoundError: no checkpoint or no dataset.
  """
  check_args(max_images=max_images, part=part, min_pixels=min_pixels)
  if experiment.is_video(config):
    raise config_lib.ConfigError(
        "config.input.proceeding_frames="
        f"{tuple(config.input.proceeding_frames)}: the study follows the "
        "image sampler; use an image config (proceeding_frames=())"
    )
  if min_pixels is None:
    min_pixels = mask_min_pixels(config)
  exp = experiment.create(config)
  meta = exp.eval_metadata()
  batch_size = predictor_lib.default_batch_size(config)
  if batch_size % exp.data_parallel_size:
    raise config_lib.ConfigError(
        f"config.evals.panoptic.batch_size={batch_size}: expected a "
        f"multiple of the {exp.data_parallel_size} data-parallel devices"
    )
  params, batch_stats = exp.restore_inference_weights(workdir)
  sample = _step_sampler(exp, meta.num_classes)
  num_steps = config.diffusion.sample_steps
  # per_step[s]: segment_stats of every image at step s; s = num_steps is
  # the returned prediction (the final row).
  per_step: list[list[dict[str, Any]]] = [[] for _ in range(num_steps + 1)]
  stats = functools.partial(segment_stats, is_thing=meta.is_thing,
                            min_pixels=min_pixels, part=part)
  rng = jax.random.key(config.seed)
  batches = pipeline.make_eval_batches(
      exp.source(config.input.eval_split), batch_size=batch_size,
      preprocess_fn=experiment.eval_preprocess_fn(config), shard_index=0,
      shard_count=1, max_examples=max_images)
  images = 0
  for i, batch in enumerate(batches):
    arrays = sharding.global_batch(
        {"image": batch["image"]}, exp.mesh, config.sharding_rules)
    with jax.set_mesh(exp.mesh):
      out = sample(params, batch_stats, arrays["image"],
                   jax.random.fold_in(rng, i))
    semantic, instance, steps_sem, steps_inst = (np.asarray(x) for x in out)
    for j in np.flatnonzero(np.asarray(batch["_mask"], bool)):
      gt = (batch["semantic"][j], batch["instance"][j])
      prev = None
      for s in range(num_steps):
        per_step[s].append(stats(*gt, steps_sem[j, s], steps_inst[j, s],
                                 prev_instance=prev))
        prev = steps_inst[j, s]
      per_step[num_steps].append(
          stats(*gt, semantic[j], instance[j], prev_instance=prev))
      images += 1
    logging.info("Studied %d images.", images)
  if not images:
    raise FileNotFoundError(
        f"config.input.eval_split={config.input.eval_split!r} of "
        f"config.input.data_dir={config.input.data_dir!r} holds no image")

  rows, prev_split, split, merged = [], None, [], []
  for s, per_image in enumerate(per_step):
    row = summarize_step(per_image, prev_split)
    prev_split = row.pop("split_flags")
    split.append(prev_split)
    merged.append(row.pop("merged_flags"))
    final = s == num_steps
    rows.append({"step": "final" if final else s,
                 "t": 0.0 if final else 1.0 - s / num_steps, **row})
  d = config.diffusion
  setting = {
      "workdir": workdir, "images": images, "things": rows[0]["things"],
      "min_pixels": min_pixels, "part": part,
      "stuff_identity": config.input.stuff_identity,
      "batch_size": batch_size, "seed": config.seed,
      **{k: d.get(k) for k in ("sample_steps", "td", "sampler", "self_cond",
                               "schedule", "bit_scale", "instance_bit_scale",
                               "bit_code")},
  }
  return {"setting": setting, "steps": rows[:-1], "final": rows[-1],
          "summary": track_things(np.stack(split), np.stack(merged))}


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_report(result: dict[str, Any]) -> str:
  """The study as text: the setting, a table row per step, the summary."""
  s = result["setting"]
  lines = [
      f"{s['images']} images, {s['things']} GT things (>= {s['min_pixels']} "
      f"mask pixels), part={s['part']}; sample_steps={s['sample_steps']} "
      f"td={s['td']} sampler={s['sampler']} self_cond={s['self_cond']}",
  ]
  header = ("step", "t") + COLUMNS
  table = [header] + [
      tuple(_cell(row[k]) for k in header)
      for row in [*result["steps"], result["final"]]
  ]
  widths = [max(len(r[c]) for r in table) for c in range(len(header))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True))
            for r in table]
  m = result["summary"]
  lines.append(
      f"split: any step {_cell(m['split_any'])}, final "
      f"{_cell(m['split_final'])}, resolved {_cell(m['split_resolved'])}, "
      f"final splits split since step {_cell(m['split_onset'])} (mean); "
      f"merged: any step {_cell(m['merged_any'])}, final "
      f"{_cell(m['merged_final'])}, resolved {_cell(m['merged_resolved'])}"
  )
  return "\n".join(lines)


def _check_output(output: str | None) -> None:
  """Fails before sampling when `--output`'s folder does not exist."""
  if output is None or "://" in output:
    return
  folder = os.path.dirname(os.path.abspath(os.path.expanduser(output)))
  if not os.path.isdir(folder):
    raise config_lib.ConfigError(
        f"--output={output}: folder {folder} does not exist; pass a file in "
        "an existing folder"
    )


# ------------------------------------------------------------------- CLI


def _define_flags() -> dict[str, Any]:
  """Defines the CLI's flags; called only when run as a program."""
  return dict(
      config=config_flags.DEFINE_config_file(
          "config", None, "Config file (path[:args]) the checkpoint was "
          "trained with; --config.diffusion.* sets the sampler.",
          lock_config=True,
      ),
      workdir=flags.DEFINE_string(
          "workdir", None,
          "Run directory (latest checkpoint), its checkpoints/ folder or a "
          "step folder.",
      ),
      max_images=flags.DEFINE_integer(
          "max_images", DEFAULT_MAX_IMAGES,
          "Study the first n images of config.input.eval_split.",
      ),
      output=flags.DEFINE_string(
          "output", None, "Also write the numbers to this JSON file.",
      ),
      part=flags.DEFINE_float(
          "part", DEFAULT_PART,
          "Fraction of a GT thing's pixels an id must cover to count "
          "(0 < part <= 0.5).",
      ),
      min_pixels=flags.DEFINE_integer(
          "min_pixels", None,
          "Smallest counted GT thing in mask pixels (default: "
          "config.evals.panoptic.min_pixels scaled to the mask size).",
      ),
  )


def _main(argv: Sequence[str], cli: dict[str, Any]) -> None:
  reporting.configure_terminal(flags.FLAGS.verbosity)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # As main.py and predict.py: the evaluator's random numbers.
  jax.config.update("jax_threefry_partitionable", True)
  output = cli["output"].value
  try:
    _check_output(output)
    result = study(
        cli["config"].value, cli["workdir"].value,
        max_images=cli["max_images"].value, part=cli["part"].value,
        min_pixels=cli["min_pixels"].value,
    )
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_report(result))
  if output is not None:
    atomic.write_json(output, result, indent=1)


if __name__ == "__main__":
  _cli = _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(
      functools.partial(_main, cli=_cli), flags_parser=config_lib.parse_flags
  )
