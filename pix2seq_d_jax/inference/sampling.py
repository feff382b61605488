"""Samplers of masks: the image encoder once, the decoder in `lax.scan`.

`make_predict_fn` segments images (paper Algorithm 2: DDIM with time
difference and optional self-conditioning, only the decoder inside the
sampler's scan); `make_video_predict_fn` walks whole clips frame by frame,
conditioning each frame on the masks predicted for the frames before it.
Both return pure functions of `(params, batch_stats, inputs, rng)`, jitted
by their callers (`experiment.Experiment`, the predictors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pix2seq_d_jax.diffusion import analog_bits, sampler, video_conditioning


def _bit_scale(d: ml_collections.ConfigDict) -> float | np.ndarray:
  """The config's input scaling: one b, or a per-bit vector (two channels)."""
  return analog_bits.channel_scales(
      d.bit_scale, d.get("instance_bit_scale"), d.bits_per_channel)


def masks_sampler(
    model: nn.Module,
    d: ml_collections.ConfigDict,
    *,
    num_classes: int,
    max_instances: int,
    return_trajectory: bool = False,
) -> Callable[..., Any]:
  """Returns a sampler of masks from encoder features.

  `sample_masks(variables, encoded, rng, steps, cond_map=None)` samples the
  analog bits of the images whose encoder output is `encoded` (only the
  decoder runs in the sampler's scan) and decodes them into int32
  [b, h', w'] (semantic, instance) maps at the model's (h', w') mask_size,
  plus the trajectory when asked.
  """
  num_bits = 2 * d.bits_per_channel

  def sample_masks(variables, encoded, rng, steps, cond_map=None):
    m = model.mask_size

    def decode_fn(x_t, gamma_t, x0_sc):
      return model.apply(
          variables,
          x_t,
          gamma_t,
          encoded,
          self_cond_x0=x0_sc if d.self_cond else None,
          cond_map=cond_map,
          train=False,
          method="decode",
      )

    batch = jax.tree.leaves(encoded)[0].shape[0]
    result = sampler.sample(
        decode_fn,
        rng,
        (batch, m[0], m[1], num_bits),
        num_steps=steps,
        td=d.td,
        schedule=d.schedule,
        loss_type=d.loss_type,
        scale=_bit_scale(d),
        softmax_groups=d.softmax_groups,
        self_cond=d.self_cond,
        sampler=d.sampler,
        return_trajectory=return_trajectory,
    )
    x0, trajectory = result if return_trajectory else (result, None)
    semantic, instance = analog_bits.analog_bits_to_mask(
        x0,
        bits_per_channel=d.bits_per_channel,
        num_classes=num_classes,
        max_instances=max_instances,
        code=d.bit_code,
    )
    if return_trajectory:
      return semantic, instance, trajectory
    return semantic, instance

  return sample_masks


def make_predict_fn(
    model: nn.Module,
    diff_config: ml_collections.ConfigDict,
    *,
    num_classes: int,
    max_instances: int,
    num_steps: int | None = None,
    return_trajectory: bool = False,
) -> Callable[..., Any]:
  """Returns `predict(params, batch_stats, image, rng) -> (semantic, instance)`.

  The image encoder runs once; only the decoder runs inside the sampler's
  `jax.lax.scan` over steps. Outputs are int32 [b, h', w'] at mask resolution.
  Video models (`model.cond_channels > 0`) get the conditioning of a first
  frame (zero maps for every earlier frame); use `make_video_predict_fn` to
  walk a sequence.
  """
  steps = num_steps or diff_config.sample_steps
  sample_masks = masks_sampler(
      model, diff_config, num_classes=num_classes,
      max_instances=max_instances, return_trajectory=return_trajectory)

  def predict(params, batch_stats, image, rng):
    variables = {"params": params, "batch_stats": batch_stats}
    encoded = model.apply(variables, image, train=False, method="encode")
    cond_map = None
    if model.cond_channels:
      m = model.mask_size
      frames = model.cond_channels // (2 * diff_config.bits_per_channel)
      zeros = jnp.zeros((image.shape[0], frames, m[0], m[1]), jnp.int32)
      cond_map = video_conditioning.conditioning_map(
          zeros, zeros, bits_per_channel=diff_config.bits_per_channel,
          scale=_bit_scale(diff_config), code=diff_config.bit_code)
    return sample_masks(variables, encoded, rng, steps, cond_map)

  return predict


def make_video_predict_fn(
    model: nn.Module,
    diff_config: ml_collections.ConfigDict,
    *,
    num_classes: int,
    max_instances: int,
    proceeding_frames: tuple[int, ...],
    first_frame_steps: int | None = None,
    later_frame_steps: int | None = None,
) -> Callable[..., Any]:
  """Returns `predict(params, batch_stats, frames, rng)` for whole clips.

  It segments whole clips frame by frame, conditioning each frame on the
  model's own predictions for the frames `proceeding_frames` before it (zero
  maps before the first frame), so instance ids carry over. The encoder runs
  once over all frames of the batch; the first frame is sampled with
  `first_frame_steps` (`diffusion.sample_steps`) and the later ones with
  `later_frame_steps` (`diffusion.sample_steps_later`, fewer: the
  conditioning already says most of the answer) in a `jax.lax.scan` over
  frames that carries the last K predicted masks, so a clip is one compiled
  call per (batch, frame count) shape.

  Args on the returned function: frames float32 [b, T, H, W, 3] (T >= 1);
  rng a PRNG key; frame t uses key fold_in(rng, t).

  Returns:
    (semantic, instance), int32 [b, T, h', w'].
  """
  d = diff_config
  k = video_conditioning.history_length(proceeding_frames)
  if not model.cond_channels or k == 0:
    raise ValueError(
        "make_video_predict_fn needs a model conditioned on earlier frames "
        "(config.input.proceeding_frames non-empty).")
  first = first_frame_steps or d.sample_steps
  later = later_frame_steps or d.get("sample_steps_later") or first
  sample_masks = masks_sampler(
      model, d, num_classes=num_classes, max_instances=max_instances)

  def predict(params, batch_stats, frames, rng):
    variables = {"params": params, "batch_stats": batch_stats}
    b, t = frames.shape[:2]
    encoded = model.apply(
        variables, frames.reshape((b * t,) + frames.shape[2:]), train=False,
        method="encode")
    # [b * T, ...] -> [T, b, ...]: the scan walks the leading axis.
    encoded = jax.tree.map(
        lambda x: x.reshape((b, t) + x.shape[1:]).swapaxes(0, 1), encoded)
    m = model.mask_size
    empty = jnp.zeros((k, b, m[0], m[1]), jnp.int32)

    def frame(history, inputs, steps):
      enc_t, index = inputs
      sem_hist, inst_hist = history
      cond_map = video_conditioning.conditioning_map(
          video_conditioning.select_history(
              sem_hist, proceeding_frames).swapaxes(0, 1),
          video_conditioning.select_history(
              inst_hist, proceeding_frames).swapaxes(0, 1),
          bits_per_channel=d.bits_per_channel, scale=_bit_scale(d),
          code=d.bit_code)
      semantic, instance = sample_masks(
          variables, enc_t, jax.random.fold_in(rng, index), steps, cond_map)
      history = (
          jnp.concatenate([sem_hist[1:], semantic[None]]),
          jnp.concatenate([inst_hist[1:], instance[None]]),
      )
      return history, (semantic, instance)

    first_enc = jax.tree.map(lambda x: x[0], encoded)
    history, (sem0, inst0) = frame((empty, empty), (first_enc, 0), first)
    rest_enc = jax.tree.map(lambda x: x[1:], encoded)
    _, (sems, insts) = jax.lax.scan(
        functools.partial(frame, steps=later), history,
        (rest_enc, jnp.arange(1, t, dtype=jnp.int32)))
    semantic = jnp.concatenate([sem0[None], sems]).swapaxes(0, 1)
    instance = jnp.concatenate([inst0[None], insts]).swapaxes(0, 1)
    return semantic, instance

  return predict
