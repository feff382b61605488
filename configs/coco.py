r"""COCO 2017 panoptic: the paper's Pix2Seq-D ResNet-50 recipe (94.5M params).

Two stages, as in the reference code's sweeps:

* `:stage=low_res` (default) pretraining, 800 epochs, batch 512, lr 1e-4 with
  5 warmup epochs, linear decay to 0.1x, large-scale jitter [1, 3], colour
  jitter 1.0. The reference does not record the image size of this stage; we
  use image 512 / mask 256 (mask stride 2, as in the high-res stage).
* `:stage=high_res` finetuning from the low-res checkpoint
  (`--config.model_init=<low-res workdir>`), image 1024 / mask 512, 15 epochs,
  batch 16, lr 1e-5, no warmup, no jitter.

Evaluation: DDIM, 20 steps, td 2.0 (the recipes evaluate td 1.0 and 2.0),
min_pixels 40, EMA weights (decay 0.999). Expected (paper Table 1, 20 steps):
PQ 50.3 / PQ_th 55.3 / PQ_st 42.9 on val2017.

Hardware the recipe assumes: TPU v3-128 class for pretraining (batch 512).

  python -m pix2seq_d_jax.main --config=configs/coco.py:stage=low_res \
      --config.input.data_dir=/data/coco --workdir=gs://bucket/p2sd_coco
"""

from configs import common
from pix2seq_d_jax import config_lib

COCO_TRAIN_IMAGES = 118287


def get_config(arg: str | None = None):
  """Returns the COCO config; `arg`: `stage=low_res|high_res`."""
  arg = config_lib.parse_arg(arg, stage="low_res")
  config = common.get_base_config()
  config.input.source = "coco_panoptic"
  config.input.data_dir = ""  # Folder with train2017/, val2017/, annotations/.
  config.input.max_instances = 101
  # The reference's target: every segment, stuff included, a random id.
  config.input.stuff_identity = "random"
  config.input.num_classes = 134  # 133 categories + void.
  config.evals.panoptic.batch_size = 8
  config.evals.panoptic.min_pixels = 40
  config.diffusion.sample_steps = 20
  config.diffusion.td = 2.0
  config.ema_decay = 0.999
  config.log_training_steps = 100
  config.ckpt_steps = 2000
  config.evals.panoptic.every_steps = 20000

  if arg.stage == "low_res":
    config.total_epochs = 800.0
    config.input.batch_size = 512
    config.input.image_size = 512
    config.input.mask_size = 256
    config.input.scale_range = (1.0, 3.0)
    config.input.color_jitter = 1.0
    # grain worker processes per host: ~25 ms of CPU per example at this
    # size (input_benchmark), batch 512 over e.g. 8 hosts = 64 examples per
    # host per step: 8 workers feed a step of >= 0.2 s.
    config.input.num_workers = 8
    config.optax.lr = 1e-4
    config.optax.warmup_epochs = 5.0
    config.optax.end_lr_factor = 0.1
  elif arg.stage == "high_res":
    config.total_epochs = 15.0
    config.input.batch_size = 16
    config.input.image_size = 1024
    config.input.mask_size = 512
    config.input.scale_range = (1.0, 1.0)
    config.input.color_jitter = 0.0
    # ~4x the pixels of low_res per example, 16 examples per step.
    config.input.num_workers = 4
    config.optax.lr = 1e-5
    config.optax.warmup_steps = 0
    config.optax.end_lr_factor = 0.1
  else:
    raise config_lib.ConfigError(
        f"configs/coco.py: stage={arg.stage!r}; expected low_res or high_res"
    )
  return config
