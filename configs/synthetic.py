r"""Synthetic panoptic scenes: the default config; trains and evals on a CPU.

Procedural 64x64 scenes (4 stuff and 4 thing classes, several overlapping
instances per image, see `pix2seq_d_jax/data/synthetic.py`) are generated
once into `input.data_dir` in the COCO panoptic on-disk format and read by the
same reader as COCO. The model is the paper's architecture at toy width.

Command (2 CPU cores, about 11 minutes, val PQ reported in README.md):

  python -m pix2seq_d_jax.main --config=configs/synthetic.py \
      --workdir=/tmp/p2sd

Variants after the colon: `:tiny` (a few steps, for tests and smoke runs),
e.g. `--config=configs/synthetic.py:tiny`; `:video` trains the video model
on synthetic clips of moving, occluding shapes written in the DAVIS layout
(`pix2seq_d_jax/data/synthetic_video.py`): the decoder is conditioned on its
masks of frames -2 and -1, and evaluation segments whole val sequences and
reports DAVIS J&F (unsupervised protocol); `:video,tiny` is its smoke test.
`:long` trains twice as many steps (4800 for images).
"""

import os

import ml_collections
from ml_collections import config_dict

from configs import common
from pix2seq_d_jax import config_lib


def get_config(arg: str | None = None):
  """Returns the synthetic config; `arg` as `tiny` or `steps=N`."""
  arg = config_lib.parse_arg(arg, tiny=False, steps=0, video=False,
                             long=False)
  config = common.get_base_config()
  config.total_steps = 2400

  config.input.source = "synthetic"
  config.input.data_dir = os.path.join(
      os.path.expanduser("~"), ".cache", "pix2seq_d_jax", "synthetic"
  )
  config.input.batch_size = 8
  config.input.image_size = 64
  config.input.mask_size = 32
  # At most 6 things and 3 stuff segments per synthetic scene: ids 1..9 hold
  # every segment under either input.stuff_identity (with 'random' stuff
  # takes ids too), so no segment is dropped as overflow.
  config.input.max_instances = 10
  config.input.scale_range = (0.8, 1.25)
  config.input.flip = True
  config.input.color_jitter = 0.0
  config.input.synthetic.num_train = 2000
  config.input.synthetic.num_val = 100

  config.model = common.tiny_model()
  # XLA's own convolutions. The tiled ones (model.conv_impl="auto" on one CPU
  # device) are no faster for this model's small maps (train step min 222.2
  # vs 222.8 ms, batch 8), and "lax" trains the checkpoint the README's
  # studies were made on, digit for digit. Same model, same maths: only the
  # float summation order differs (see the README's Results).
  config.model.conv_impl = "lax"

  # Input scaling b = 1.0, not the paper's 0.1: with b = 0.1 the noisy bits
  # carry signal (SNR > 1) only for t < ~0.06 under the cosine schedule, so a
  # 10-minute CPU run learns to ignore them and gives every instance of a
  # class the same id (measured, 1200 steps of batch 16: PQ 0.52, things
  # 0.15 with b = 0.1; 0.57 / 0.27 with b = 1.0 and td = 2). The paper's
  # b = 0.1 wins only at convergence (Table 3); COCO keeps it.
  config.diffusion.bit_scale = 1.0
  # Sampling: 50 DDIM steps with td = 49 (= steps - 1), so every update
  # lands on t = 0: the first step denoises the starting noise, and each
  # later step re-denoises the previous clean estimate, told a decreasing
  # noise level (0.98 ... 0.02). The paper's td of 1-2 leaves things split
  # over 2-3 instance ids; the re-denoising merges them (measured on the same
  # checkpoint: things PQ 0.316 with 10 steps / td 2, 0.372 with 50 / 2,
  # 0.547 with 50 / 49; README, Results).
  config.diffusion.sample_steps = 50
  config.diffusion.td = 49.0

  config.optax.lr = 1e-3
  config.optax.warmup_steps = 200
  config.optax.end_lr_factor = 0.05
  config.optax.weight_decay = 0.01
  config.ema_decay = 0.99

  config.evals.panoptic.batch_size = 20
  # In original pixels (the size rule applies after resizing to the image):
  # 16 = 4 mask pixels at this 2x mask stride.
  config.evals.panoptic.min_pixels = 16
  config.evals.panoptic.num_overlays = 8

  config.log_training_steps = 100
  config.ckpt_steps = 1000
  config.keep_ckpt = 2

  if arg.video:
    _make_video(config)
  if arg.long:
    # Twice the training of the job (4800 steps for images): where the
    # recipe goes with more compute (README, Results: PQ 0.742, things
    # 0.591 against 0.716 / 0.547).
    config.total_steps *= 2
    config.ckpt_steps = 2400
  if arg.tiny:
    config.total_steps = 4
    config.input.image_size = 32
    config.input.mask_size = 16
    config.input.batch_size = 4
    config.input.synthetic.num_train = 16
    config.input.synthetic.num_val = 4
    config.diffusion.sample_steps = 2
    config.diffusion.sample_steps_later = 1
    config.optax.warmup_steps = 1
    config.input.synthetic_video.num_train = 4
    config.input.synthetic_video.num_val = 2
    config.input.synthetic_video.num_frames = 4
    for ev in config.evals.values():
      ev.batch_size = 2 if arg.video else 4
    config.log_training_steps = 2
    config.ckpt_steps = 2
  if arg.steps:
    config.total_steps = arg.steps
  return config


def _make_video(config) -> None:
  """Turns the synthetic image config into the synthetic video config."""
  config.total_steps = 2000
  config.input.source = "synthetic_video"
  config.input.data_dir = os.path.join(
      os.path.expanduser("~"), ".cache", "pix2seq_d_jax", "synthetic_video"
  )
  config.input.synthetic_video.num_train = 200
  config.input.synthetic_video.num_val = 10
  config.input.synthetic_video.num_frames = 8
  config.input.max_instances = 8  # At most 3 objects per clip.
  config.input.proceeding_frames = (-2, -1)
  config.input.frames_dropout = 0.2
  # As for images, every update lands on t = 0 (td >= steps - 1): on the
  # same checkpoint J&F 0.521 with 10 / 5 steps and td 2, 0.597 with td 9,
  # 0.658 with 50 / 10 steps and td 49 (README, Results).
  config.diffusion.sample_steps = 50
  config.diffusion.sample_steps_later = 10
  config.diffusion.td = 49.0
  config.evals = ml_collections.ConfigDict(
      dict(
          davis=dict(
              type="davis_video",
              every_steps=config_dict.placeholder(int),
              batch_size=2,
              task="unsupervised",
              length_bucket=8,
              max_sequences=config_dict.placeholder(int),
          )
      )
  )
