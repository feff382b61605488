r"""DAVIS 2017 unsupervised video object segmentation, Pix2Seq-D R50.

The paper's video recipe (PIX2SEQ_D.md section 4): image 512x1024, mask
256x512, conditioning on the predicted masks of frames -2 and -1, frame
dropout 0.2, at most 16 instances, initialised from a COCO checkpoint
(`--config.model_init=DIR`). Expected (paper): J&F 68.4 / J 65.1 / F 71.7 on
DAVIS 2017 val. The DAVIS loader, the frame-conditioned decoder input and the
J&F evaluator come with the video issue; this config already fixes the model
(its decoder input carries 2 x 16 conditioning bit channels) and the recipe.
Until then a square 512 image / 256 mask stands in for 512x1024.

  python -m pix2seq_d_jax.main --config=configs/davis.py \
      --config.input.data_dir=/data/DAVIS --config.model_init=COCO_DIR \
      --workdir=DIR
"""

from configs import common
from pix2seq_d_jax import config_lib


def get_config(arg: str | None = None):
  """Returns the DAVIS config (no arguments)."""
  config_lib.parse_arg(arg)
  config = common.get_base_config()
  config.input.source = "davis"
  config.input.data_dir = ""
  config.input.num_classes = 3  # Void, background and object.
  config.input.max_instances = 16
  config.input.batch_size = 16
  config.input.image_size = 512
  config.input.mask_size = 256
  config.input.scale_range = (1.0, 2.0)
  config.input.color_jitter = 0.0
  config.input.proceeding_frames = (-2, -1)
  config.input.frames_dropout = 0.2
  config.total_steps = 40000
  config.optax.lr = 1e-5
  config.optax.warmup_steps = 0
  config.diffusion.sample_steps = 20
  config.diffusion.td = 2.0
  config.evals = {}
  return config
