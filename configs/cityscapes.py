r"""Cityscapes panoptic (19 train classes: 11 stuff + 8 things), Pix2Seq-D R50.

Read from the layout that cityscapesScripts' panoptic conversion writes
(`leftImg8bit/`, `gtFine/cityscapes_panoptic_{split}.json` and PNG folders);
the loader comes with the real-datasets issue. The model and diffusion recipe
are the COCO ones (paper). Sizes: image 1024x2048 / mask 512x1024
(height x width), the full Cityscapes frame at the COCO high-res stage's
scale and mask stride 2 (the reference records no Cityscapes-specific
sizes). Frames are not padded or shrunk, and the mask keeps the high-res
stage's detail. It is twice the COCO high-res stage's pixels, and the
attention grows with the square of that: the encoder attends over a 64x128
token grid and the TransUNet bottleneck over another 8192 tokens, so the
float32 attention probabilities a backward pass keeps come to about
12 x 16 heads x 8192^2 x 4 B = 51 GB (encoder) + 6 x 2 x 8 heads x 8192^2
x 4 B = 26 GB (decoder self- and cross-attention) per example, against
about 19 GB at 1024x1024. That is beyond one accelerator's memory, so this
config recomputes each block's activations in the backward pass
(`remat='blocks'`: one block's attention, about 4 GB per example, is live
at a time; the parameters and outputs are unchanged). Still plan on one
example per accelerator, and add `--config.grad_accum_steps` where that
does not fit.
Initialise from a COCO checkpoint with `--config.model_init=DIR`.

  python -m pix2seq_d_jax.main --config=configs/cityscapes.py \
      --config.input.data_dir=/data/cityscapes --workdir=DIR
"""

from configs import common
from pix2seq_d_jax import config_lib


def get_config(arg: str | None = None):
  """Returns the Cityscapes panoptic config (no arguments)."""
  config_lib.parse_arg(arg)
  config = common.get_base_config()
  config.input.source = "cityscapes_panoptic"
  config.input.data_dir = ""
  config.input.num_classes = 20  # 19 train classes + void.
  config.input.max_instances = 101
  # The reference's target: every segment, stuff included, a random id.
  config.input.stuff_identity = "random"
  config.input.batch_size = 16
  config.input.image_size = (1024, 2048)  # (height, width)
  config.input.mask_size = (512, 1024)
  config.input.scale_range = (0.5, 2.0)
  config.input.color_jitter = 0.0
  # grain worker processes per host (see README, "Input that keeps up").
  config.input.num_workers = 4
  config.total_steps = 60000
  config.optax.lr = 1e-5
  config.optax.warmup_steps = 0
  config.diffusion.sample_steps = 20
  config.diffusion.td = 2.0
  # Memory at 1024x2048: see the module docstring.
  config.remat = "blocks"
  config.evals.panoptic.type = "coco_panoptic"
  config.evals.panoptic.every_steps = 5000
  config.evals.panoptic.min_pixels = 40
  return config
