r"""KITTI-STEP video panoptic segmentation, Pix2Seq-D R50.

The reference video recipe for KITTI-STEP (the
reference's `config_diffusion_panoptic_video.py` sweep): image 384x1248, mask
192x624, conditioning on the masks of frames -2 and -1, frame dropout 0.2,
instance ids 0..255 (`max_instances_per_image` 256 incl. 0), no scale or
colour jitter, batch 32 for 50k steps, lr 1e-5 (3e-5 also swept) held
constant, no warmup, EMA 0.99; initialise from a COCO or Cityscapes
checkpoint (`--config.model_init=DIR`). Metric: STQ (deeplab2 rules,
`pix2seq_d_jax.evaluation.stq`); the paper reports no KITTI-STEP number to
hold to. Data: the deeplab2 layout read by the 'kitti_step' source, 19
Cityscapes classes + void (person and car tracked).

A KITTI frame (about 375x1242) is scaled to fit 384x1248 keeping its
aspect ratio and padded at the bottom and right. Per axis the sizes meet the
paper model's rules: 384 and 1248 are multiples of 16 (a 24x78 stride-16
grid for the encoder), the mask is half the image on both axes, and 192 and
624 are divisible by 2**(len(dec_dim_mults) - 1) = 8 (a 24x78 U-Net
bottleneck).
`evals.stq` ('kitti_step_stq') segments whole val sequences with the video
sampler every 5000 steps and at the end, reports `eval/stq/{stq,aq,sq}` and
writes STEP PNGs that `python -m pix2seq_d_jax.evaluation.stq` scores the
same. A whole sequence is one predict call (its frames are encoded
together), so long sequences need memory; `max_frames` scores only the
first frames of each (not the benchmark's number).

  python -m pix2seq_d_jax.main --config=configs/kitti_step.py \
      --config.input.data_dir=/data/kitti_step --config.model_init=CKPT_DIR \
      --workdir=DIR
"""

import ml_collections
from ml_collections import config_dict

from configs import common
from pix2seq_d_jax import config_lib


def get_config(arg: str | None = None):
  """Returns the KITTI-STEP config (no arguments)."""
  config_lib.parse_arg(arg)
  config = common.get_base_config()
  config.input.source = "kitti_step"
  config.input.data_dir = ""
  config.input.num_classes = 20  # 19 Cityscapes train classes + void.
  config.input.max_instances = 256
  # 'zero' as the reference: KITTI-STEP labels keep stuff at instance 0
  # (STQ tracks thing pixels only).
  config.input.stuff_identity = "zero"
  config.input.batch_size = 32
  config.input.image_size = (384, 1248)  # (height, width), as the paper.
  config.input.mask_size = (192, 624)
  config.input.scale_range = (1.0, 1.0)
  config.input.color_jitter = 0.0
  config.input.proceeding_frames = (-2, -1)
  config.input.frames_dropout = 0.2
  # 32 clips of 3 large frames per step: grain worker processes per host
  # (README, "Input that keeps up").
  config.input.num_workers = 8
  config.total_steps = 50000
  config.optax.lr = 1e-5
  config.optax.warmup_steps = 0
  config.optax.end_lr_factor = 1.0
  config.ema_decay = 0.99
  config.diffusion.sample_steps = 20
  config.diffusion.td = 2.0
  config.evals = ml_collections.ConfigDict(
      dict(
          stq=dict(
              type="kitti_step_stq",
              every_steps=5000,
              # Sequences per eval batch (a multiple of the data-parallel
              # devices); each runs all its frames in one call.
              batch_size=8,
              # Frame counts are padded to a multiple of this: one compile
              # per bucket.
              length_bucket=64,
              max_sequences=config_dict.placeholder(int),
              # Only the first n frames of each sequence (None = all).
              max_frames=config_dict.placeholder(int),
              write_predictions=True,
          )
      )
  )
  return config
