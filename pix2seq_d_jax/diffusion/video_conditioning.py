"""Conditioning the mask decoder on the masks of earlier frames (video).

Pix2Seq-D segments and tracks video by giving the decoder, besides the noisy
bits and the image features, the panoptic masks of the preceding frames
(`proceeding_frames`, e.g. (-2, -1)): instance ids then carry over from frame
to frame without any matching step (paper, section 4). Each earlier
frame's (semantic, instance) map is written as analog bits, the same code and
scale b as the target, and the frames are concatenated on channels in the
order of `proceeding_frames`. In training the maps are ground truth and each
is, with probability `frames_dropout`, replaced by a zero map (all classes and
ids 0) before the bit encoding; at inference they are the model's own
predictions, and frames before the first one are zero maps too, so "no
earlier frame" looks the same in training and in inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pix2seq_d_jax.diffusion import analog_bits


def history_length(proceeding_frames: Sequence[int]) -> int:
  """How many earlier frames the conditioning looks back (max of -offset).

  Raises:
    ValueError: if an offset is not a negative int or offsets repeat.
  """
  frames = tuple(proceeding_frames)
  if any(not isinstance(f, int) or f >= 0 for f in frames) or (
      len(set(frames)) != len(frames)):
    raise ValueError(
        f'proceeding_frames={frames}: expected distinct negative frame '
        'offsets such as (-2, -1).')
  return max((-f for f in frames), default=0)


def frame_dropout_keep(rng: jax.Array, batch: int, num_frames: int,
                       rate: float) -> jax.Array:
  """bool [batch, num_frames]: which conditioning frames are kept.

  Each (example, frame) is dropped independently with probability `rate`.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'frames_dropout={rate} must be in [0, 1].')
  return jax.random.uniform(rng, (batch, num_frames)) >= rate


def conditioning_map(cond_semantic: jax.typing.ArrayLike,
                     cond_instance: jax.typing.ArrayLike, *,
                     bits_per_channel: int,
                     scale: float | jax.typing.ArrayLike,
                     code: str = 'binary',
                     keep: jax.typing.ArrayLike | None = None) -> jax.Array:
  """The decoder's conditioning input from earlier frames' masks.

  Args:
    cond_semantic: int32 [b, F, h, w] class maps of the F conditioning
      frames, in `proceeding_frames` order.
    cond_instance: int32 [b, F, h, w] instance ids of the same frames.
    bits_per_channel: bits per channel of the analog bit code.
    scale: the input scaling b.
    code: one of analog_bits.BIT_CODES.
    keep: optional bool [b, F]; a False frame is replaced by a zero map
      (frame dropout) before the bit encoding.

  Returns:
    float32 [b, h, w, F * 2 * bits_per_channel]: frame f's analog bits in
    channels [f * n, (f + 1) * n), semantic bits first within each frame.

  Raises:
    ValueError: if the shapes disagree.
  """
  sem = jnp.asarray(cond_semantic)
  inst = jnp.asarray(cond_instance)
  if sem.ndim != 4 or sem.shape != inst.shape:
    raise ValueError(
        f'conditioning_map: cond_semantic {sem.shape} and cond_instance '
        f'{inst.shape} must both be [batch, frames, h, w].')
  if keep is not None:
    keep = jnp.asarray(keep)
    if keep.shape != sem.shape[:2]:
      raise ValueError(f'conditioning_map: keep {keep.shape} must be '
                       f'[batch, frames] = {sem.shape[:2]}.')
    mask = keep[:, :, None, None]
    sem = jnp.where(mask, sem, 0)
    inst = jnp.where(mask, inst, 0)
  b, f, h, w = sem.shape
  analog = analog_bits.mask_to_analog_bits(
      sem, inst, bits_per_channel=bits_per_channel, scale=scale, code=code)
  # [b, F, h, w, n] -> [b, h, w, F * n] with frame-major channels.
  return analog.transpose(0, 2, 3, 1, 4).reshape(b, h, w, -1)


def select_history(history: jax.Array,
                   proceeding_frames: Sequence[int]) -> jax.Array:
  """Picks the conditioning frames from a rolling history.

  Args:
    history: [K, ...] masks of the last K frames, oldest first (index K - 1
      is the previous frame), with K = history_length(proceeding_frames).
    proceeding_frames: negative offsets; -1 is history[K - 1].

  Returns:
    [F, ...] in the order of `proceeding_frames`.
  """
  k = history.shape[0]
  return jnp.stack([history[k + f] for f in proceeding_frames])
