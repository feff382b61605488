"""The full config schema with the paper's defaults, shared by all configs.

Every field the framework reads exists here, so `--config.a.b=v` overrides are
checked against one schema (configs are locked) and a typo fails at start.
Model defaults are the COCO recipe of the reference code (94.5M parameters);
`tiny_model()` gives the CPU-sized variant used by `configs/synthetic.py` and
the tests.
"""

import ml_collections
from ml_collections import config_dict

from pix2seq_d_jax import config_lib


def size_field(value: int | tuple[int, int]) -> config_dict.FieldReference:
  """A config field for an image or mask size: an int or an (h, w) pair.

  The field is typed `object`, so a dataset config may set either form and
  ml_collections parses a command-line override as a Python literal:
  `--config.input.image_size=64` gives 64 (a square) and
  `--config.input.image_size='(32,64)'` (or `=32,64`) gives (32, 64). An
  int-typed field would refuse the pair, a tuple-typed one would turn `=64`
  into (64,). `config_lib.size_hw` normalises and checks the value.
  """
  return config_dict.FieldReference(value, field_type=object)


def paper_model() -> ml_collections.ConfigDict:
  """Pix2Seq-D ResNet-50 model of the paper's COCO recipe (reference code)."""
  return ml_collections.ConfigDict(
      dict(
          name="pix2seq_d",
          backbone_depths=(3, 4, 6),
          backbone_width=64,
          backbone_norm="batch",
          bn_momentum=0.9,
          freeze_backbone=False,
          enc_layers=12,
          enc_dim=512,
          enc_mlp_dim=2048,
          enc_heads=16,
          enc_drop_path=0.1,
          enc_dropout=0.1,
          fuse_dim=256,
          dec_dim=128,
          dec_dim_mults=(1, 1, 2, 2),
          dec_num_res_blocks=1,
          dec_transformer_layers=6,
          dec_transformer_dim=512,
          dec_heads=8,
          dec_mlp_ratio=4,
          dec_dropout=0.0,
          conditional="cat+attn",
          time_scaling=10000.0,
          dtype="float32",
          # jax.default_matmul_precision of the model's products; "bfloat16"
          # (or "BF16_BF16_F32") multiplies float32 activations as bfloat16
          # operands with float32 accumulation: native on TPU/GPU, and on
          # CPU for the dense layers and tiled 1x1 convolutions
          # (docs/speed.md). None keeps jax's default.
          matmul_precision=config_dict.placeholder(str),
          # "tiled" computes 1x1 convolutions as matmuls and large-map
          # kernel gradients tile by tile (faster on XLA:CPU); "auto"
          # picks it on a single CPU device, "lax" elsewhere.
          conv_impl="auto",
          # True applies the encoder's and the bottleneck's transformer
          # blocks as one scanned body each: same parameters, a shorter
          # compile and cache load (the cached 256 / 128 train step loads
          # in 8 instead of 17 s), but a 2% slower step on CPU.
          scan_layers=False,
      )
  )


def tiny_model() -> ml_collections.ConfigDict:
  """A CPU-sized model with the same structure (about 0.5M parameters)."""
  model = paper_model()
  model.update(
      backbone_depths=(1, 1, 1),
      backbone_width=16,
      backbone_norm="batch",
      enc_layers=2,
      enc_dim=64,
      enc_mlp_dim=128,
      enc_heads=4,
      enc_drop_path=0.0,
      enc_dropout=0.0,
      fuse_dim=32,
      dec_dim=32,
      dec_dim_mults=(1, 2, 2),
      dec_num_res_blocks=1,
      dec_transformer_layers=1,
      dec_transformer_dim=64,
      dec_heads=4,
  )
  return model


def get_base_config() -> ml_collections.ConfigDict:
  """All fields with the paper's settings; dataset configs override them."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # The generator the parameters are initialised with, seeded from `seed`
  # (jax's names: 'threefry2x32', 'rbg', 'unsafe_rbg'). 'unsafe_rbg' halves
  # the CPU time of compiling the initialisation (30 -> 15 s at 256 / 128),
  # which shares the cores with the train step's compile at start-up;
  # 'threefry2x32' gives the initial values of releases before it.
  config.init_prng_impl = config_lib.INIT_PRNG_IMPL_DEFAULT
  # One value read by the training target and the panoptic post-processing
  # (config.input.stuff_identity and config.evals.panoptic.stuff_identity
  # share it: setting either sets both).
  stuff_identity = config_dict.FieldReference(
      config_lib.STUFF_IDENTITY_DEFAULT, field_type=str)

  # Durations: set exactly one spelling (_steps/_epochs/_examples).
  config.total_steps = config_dict.placeholder(int)
  config.total_epochs = config_dict.placeholder(float)
  config.total_examples = config_dict.placeholder(int)

  config.input = ml_collections.ConfigDict(
      dict(
          source="coco_panoptic",
          data_dir="",
          train_split="train",
          eval_split="val",
          batch_size=512,
          # Sizes: an int (a square) or (height, width); see size_field.
          image_size=size_field(256),
          mask_size=size_field(64),
          # Classes incl. void; filled from the dataset metadata when None.
          num_classes=config_dict.placeholder(int),
          max_instances=101,
          # Instance ids of stuff: 'random' (the reference) gives every
          # segment, stuff included, its own random id in 1..max_instances-1
          # (so max_instances must hold things + stuff segments) and each
          # predicted id takes the class most of its pixels have; 'zero'
          # keeps stuff at id 0 (one segment per stuff class) and ids vote
          # among thing pixels only (a deviation). Default 'zero'
          # (config_lib.STUFF_IDENTITY_DEFAULT): it trains better on the
          # synthetic set, PQ / things / stuff 0.603 / 0.316 / 0.889 against
          # 0.151 / 0.180 / 0.121 with 'random' (the default job, 2400 steps;
          # 0.091 / 0.133 / 0.049 with 'random' and max_instances 32), where
          # stuff regions split over several ids. The paper configs set the
          # reference's value per dataset.
          stuff_identity=stuff_identity,
          scale_range=(1.0, 3.0),
          flip=True,
          color_jitter=1.0,
          num_workers=0,
          skip_bad_examples=False,
          max_train_examples=config_dict.placeholder(int),
          # Video: condition the decoder on the masks of these earlier
          # frames (e.g. (-2, -1)); () = image model.
          proceeding_frames=(),
          # Video training: probability of replacing a conditioning frame's
          # ground-truth mask by a zero map.
          frames_dropout=0.1,
          # Parameters of the synthetic generator (source='synthetic' only).
          synthetic=ml_collections.ConfigDict(
              dict(num_train=2000, num_val=100, image_size=size_field(64),
                   seed=0)
          ),
          # Parameters of the synthetic video generator
          # (source='synthetic_video' only).
          synthetic_video=ml_collections.ConfigDict(
              dict(num_train=64, num_val=8, num_frames=8,
                   image_size=size_field(64), seed=0)
          ),
      )
  )
  config.model = paper_model()
  config.diffusion = ml_collections.ConfigDict(
      dict(
          bit_scale=0.1,
          # Not in the paper (an option of this framework): the instance
          # channel's own input scaling; None = bit_scale for every bit.
          instance_bit_scale=config_dict.placeholder(float),
          bits_per_channel=8,
          bit_code="binary",
          schedule="cosine",
          loss_type="x_softmax_xent",
          softmax_groups=2,
          loss_weight_power=0.2,
          # loss_type='eps' only: the reference ignores the small-instance
          # weights for eps (a plain mean); True applies them (a deviation).
          eps_loss_weighted=False,
          self_cond=False,
          self_cond_rate=0.5,
          sampler="ddim",
          sample_steps=20,
          # Video: steps for every frame after the first (None = the same).
          sample_steps_later=config_dict.placeholder(int),
          td=1.0,
      )
  )
  config.optax = ml_collections.ConfigDict(
      dict(
          lr=1e-4,
          warmup_steps=config_dict.placeholder(int),
          warmup_epochs=config_dict.placeholder(float),
          warmup_examples=config_dict.placeholder(int),
          warmup_percent=config_dict.placeholder(float),
          end_lr_factor=0.1,
          weight_decay=0.05,
          b1=0.9,
          b2=0.999,
          grad_clip_norm=1.0,
      )
  )
  config.ema_decay = 0.999
  # EMA updated every k steps with decay**k; 1 = every step (the paper's).
  config.ema_every_steps = 1
  # A NaN/inf loss stops the run naming the step and the last good
  # checkpoint; True skips such updates instead (counted as train/skipped).
  config.skip_nonfinite_updates = False
  # Memory lever: run each batch as this many micro-batches, summing grads.
  config.grad_accum_steps = 1
  # Memory lever: 'none' | 'encoder' | 'decoder' | 'both' recompute those
  # parts' activations in the backward pass instead of storing them;
  # 'blocks' | 'blocks_dots' do it per ResNet/transformer/U-Net block (the
  # latter keeps matmul and conv outputs). Off: it did not lower temporary
  # memory on CPU, with either cpu_scheduler (README, Scaling out).
  config.remat = "none"
  # Memory lever on CPU: 'memory' orders the train step's operations to
  # keep few temporaries alive (2.27 instead of 2.87 GiB at 256 / 128, same
  # step time); 'concurrency' is XLA:CPU's own concurrency-optimised order.
  config.cpu_scheduler = "memory"
  # Speed lever on CPU: 'eigen' runs XLA:CPU's convolutions with Eigen
  # instead of YNNPACK (train step 8.42 -> 7.48 s at 256 / 128); 'ynnpack'
  # keeps XLA's default. Set in XLA_FLAGS by the entry points; process-wide.
  config.cpu_convolutions = "eigen"
  # Keep the train step's host temporaries mapped from step to step: once
  # compiled, single-device CPU computations run on the calling thread and
  # glibc keeps freed memory (no mmap, no trimming), instead of ~700,000
  # page faults per step at 256 / 128. Process-wide; False keeps jax's and
  # glibc's defaults.
  config.reuse_host_memory = True
  # Keep the lowered train step beside jax's persistent compilation cache
  # (`pix2seq_d_jax/trace_cache.py`): a warm start reads it back instead of
  # tracing the step (5-7 s of the paper model's start-up on CPU). Off for
  # code changed at run time (monkeypatching), which its key cannot see.
  config.trace_cache = True

  config.evals = ml_collections.ConfigDict()
  config.evals.panoptic = ml_collections.ConfigDict(
      dict(
          type="coco_panoptic",
          # None: evaluate only at the end of training.
          every_steps=config_dict.placeholder(int),
          batch_size=8,
          max_examples=config_dict.placeholder(int),
          min_pixels=40,
          num_overlays=8,
          # Crowd rule of the PQ matcher: 'last' (panopticapi's) or 'merge'
          # (all crowd segments of a category; a deviation).
          crowd="last",
          # The same value as config.input.stuff_identity (shared).
          stuff_identity=stuff_identity,
      )
  )

  # Mesh: (axis, size) pairs, -1 = the remaining devices. Data parallel.
  config.mesh = [("data", -1)]
  # Logical axis -> mesh axes, in order of precedence; names without a rule
  # are replicated. `batch` is every batch's (and activation's) leading
  # axis; mesh axes the mesh lacks are dropped, so this is data parallel on
  # a `data` mesh. FSDP: mesh [("fsdp", -1)] (or [("data", 2), ("fsdp",
  # -1)]) and add ("embed", "fsdp"), ("conv_out", "fsdp"). Tensor parallel:
  # mesh [("data", -1), ("model", 4)] and add ("mlp", "model"), ("heads",
  # "model"), ("conv_out", "model").
  config.sharding_rules = [
      ("batch", ("data", "fsdp")),
  ]

  config.log_training_steps = 50
  config.ckpt_steps = 1000
  config.keep_ckpt = 3
  config.model_init = ""
  config.resume = ""
  return config
