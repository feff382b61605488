"""Video: conditioning on earlier frames, frame dropout, the frame scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from pix2seq_d_jax import config_lib, experiment
from pix2seq_d_jax.diffusion import analog_bits, video_conditioning
from pix2seq_d_jax.inference import sampling
from tests.multiprocess_worker import NARROW_MODEL

IMAGE, MASK = 32, 16
FRAMES = (-2, -1)


def test_conditioning_map_layout_and_dropout():
  sem = np.zeros((1, 2, 2, 2), np.int32)
  inst = np.zeros((1, 2, 2, 2), np.int32)
  sem[0, 0, 0, 0], inst[0, 0, 0, 0] = 3, 1  # Frame -2, pixel (0, 0).
  sem[0, 1, 1, 1], inst[0, 1, 1, 1] = 1, 2  # Frame -1, pixel (1, 1).
  out = video_conditioning.conditioning_map(
      sem, inst, bits_per_channel=2, scale=0.5)
  assert out.shape == (1, 2, 2, 8)
  # Frame-major channels: [frame -2: sem b0 b1, inst b0 b1, frame -1: ...];
  # bits least significant first, bit 1 -> +0.5, bit 0 -> -0.5.
  np.testing.assert_array_equal(
      out[0, 0, 0], [0.5, 0.5, 0.5, -0.5, -0.5, -0.5, -0.5, -0.5])
  np.testing.assert_array_equal(
      out[0, 1, 1], [-0.5, -0.5, -0.5, -0.5, 0.5, -0.5, -0.5, 0.5])
  np.testing.assert_array_equal(out[0, 0, 1], [-0.5] * 8)
  # Dropping frame -2 turns its channels into the bits of a zero map.
  dropped = video_conditioning.conditioning_map(
      sem, inst, bits_per_channel=2, scale=0.5, keep=[[False, True]])
  np.testing.assert_array_equal(dropped[..., :4], -0.5)
  np.testing.assert_array_equal(dropped[..., 4:], out[..., 4:])
  with pytest.raises(ValueError, match="keep"):
    video_conditioning.conditioning_map(
        sem, inst, bits_per_channel=2, scale=0.5, keep=[[True]])


def test_frame_dropout_rate_and_history():
  key = jax.random.key(0)
  assert bool(video_conditioning.frame_dropout_keep(key, 4, 2, 0.0).all())
  assert not bool(video_conditioning.frame_dropout_keep(key, 4, 2, 1.0).any())
  kept = video_conditioning.frame_dropout_keep(key, 5000, 2, 0.2)
  assert kept.shape == (5000, 2)
  assert abs(float(kept.mean()) - 0.8) < 0.02
  assert video_conditioning.history_length((-2, -1)) == 2
  assert video_conditioning.history_length((-3,)) == 3
  with pytest.raises(ValueError, match="proceeding_frames"):
    video_conditioning.history_length((-1, 1))
  hist = jnp.arange(3)[:, None]  # Oldest first: frames -3, -2, -1.
  np.testing.assert_array_equal(
      video_conditioning.select_history(hist, (-1, -3)), [[2], [0]])


def _video_config(frames_dropout=0.0):
  model = common.tiny_model()
  # A skeleton (no transformer layers, one decoder level): conditioning
  # and the frame scan are under test, and compiles take seconds.
  model.update(NARROW_MODEL)
  config = common.get_base_config()
  config.model = model
  config.input.image_size, config.input.mask_size = IMAGE, MASK
  config.input.proceeding_frames = FRAMES
  config.input.frames_dropout = frames_dropout
  config.input.max_instances = 8
  config.diffusion.sample_steps = 3
  config.diffusion.sample_steps_later = 2
  return config


@pytest.fixture(scope="module")
def video_model():
  config = _video_config()
  config.optax.update(lr=1e-3, end_lr_factor=0.1, weight_decay=0.0,
                      grad_clip_norm=1.0)
  config.ema_decay = 0.5
  exp = experiment.create(config, total_steps=10)
  model = exp.model
  assert model.cond_channels == 2 * 16
  state = exp.init_state(jax.random.key(0))
  # A fresh decoder's zero-initialised output layer ignores its inputs: give
  # it random weights so the outputs depend on the conditioning.
  def randomise(params):
    conv_out = params["decoder"]["conv_out"]
    kernel = 0.3 * jax.random.normal(jax.random.key(5),
                                     conv_out["kernel"].shape)
    return dict(params, decoder=dict(
        params["decoder"], conv_out=dict(conv_out, kernel=kernel)))

  state = state.replace(params=randomise(state.params),
                        ema_params=randomise(state.ema_params))
  return config, exp, state


def _clip_batch(b=2, seed=0):
  rng = np.random.default_rng(seed)
  sem = np.ones((b, MASK, MASK), np.int32)
  inst = np.zeros((b, MASK, MASK), np.int32)
  sem[:, 4:12, 4:12], inst[:, 4:12, 4:12] = 2, 3
  cond_sem = np.ones((b, 2, MASK, MASK), np.int32)
  cond_inst = np.zeros((b, 2, MASK, MASK), np.int32)
  cond_sem[:, :, 3:11, 4:12], cond_inst[:, :, 3:11, 4:12] = 2, 3
  return {
      "image": jnp.asarray(rng.uniform(size=(b, IMAGE, IMAGE, 3)),
                           jnp.float32),
      "semantic": jnp.asarray(sem),
      "instance": jnp.asarray(inst),
      "loss_weight": jnp.ones((b, MASK, MASK), jnp.float32),
      "cond_semantic": jnp.asarray(cond_sem),
      "cond_instance": jnp.asarray(cond_inst),
  }


def test_train_step_uses_conditioning_and_frame_dropout(video_model):
  config, _, state = video_model

  def step_with_dropout(rate):
    c = config.copy_and_resolve_references()
    c.input.frames_dropout = rate
    return jax.jit(experiment.create(c, total_steps=10).train_step_fn())

  steps = {rate: step_with_dropout(rate) for rate in (0.0, 1.0)}

  def loss(batch, frames_dropout):
    _, metrics = steps[frames_dropout](state, batch, jax.random.key(1))
    return float(metrics["loss"])

  batch = _clip_batch()
  zero_cond = dict(batch, cond_semantic=jnp.zeros_like(batch["cond_semantic"]),
                   cond_instance=jnp.zeros_like(batch["cond_instance"]))
  plain = loss(zero_cond, 0.0)
  # Dropping every frame is the same as conditioning on zero maps ...
  assert loss(batch, 1.0) == pytest.approx(plain, rel=1e-6)
  # ... and the conditioning really reaches the decoder.
  assert loss(batch, 0.0) != pytest.approx(plain, rel=1e-6)
  del batch["cond_instance"]
  with pytest.raises(ValueError, match="cond_instance"):
    loss(batch, 0.0)


def test_frame_scan_equals_python_loop(video_model):
  config, exp, state = video_model
  model, d = exp.model, config.diffusion
  b, t = 2, 4
  frames = jax.random.uniform(jax.random.key(5), (b, t, IMAGE, IMAGE, 3))
  rng = jax.random.key(7)
  predict = jax.jit(exp.video_predict_fn(3))
  sem, inst = predict(state.ema_params, state.batch_stats, frames, rng)
  assert sem.shape == inst.shape == (b, t, MASK, MASK)

  # Reference: one frame at a time in Python, its own encoder call, and the
  # conditioning built from the previous predictions by hand.
  variables = {"params": state.ema_params, "batch_stats": state.batch_stats}
  sample_masks = sampling.masks_sampler(
      model, d, num_classes=3, max_instances=8)
  preds = []
  for i in range(t):
    encoded = model.apply(variables, frames[:, i], train=False,
                          method="encode")
    earlier = [preds[i + f] if i + f >= 0 else
               (jnp.zeros((b, MASK, MASK), jnp.int32),) * 2 for f in FRAMES]
    cond = jnp.concatenate([
        analog_bits.mask_to_analog_bits(s, n, scale=d.bit_scale)
        for s, n in earlier], axis=-1)
    steps = d.sample_steps if i == 0 else d.sample_steps_later
    preds.append(sample_masks(variables, encoded, jax.random.fold_in(rng, i),
                              steps, cond))
  ref_sem = np.stack([np.asarray(p[0]) for p in preds], axis=1)
  ref_inst = np.stack([np.asarray(p[1]) for p in preds], axis=1)
  np.testing.assert_array_equal(sem, ref_sem)
  np.testing.assert_array_equal(inst, ref_inst)


def test_video_config_validation():
  config = _video_config()
  config_lib.validate(config)
  config.input.proceeding_frames = (-1, 0)
  with pytest.raises(config_lib.ConfigError, match="proceeding_frames"):
    config_lib.validate(config)
  config = _video_config(frames_dropout=1.5)
  with pytest.raises(config_lib.ConfigError, match="frames_dropout"):
    config_lib.validate(config)
