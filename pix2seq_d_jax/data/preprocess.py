"""Per-example numpy preprocessing for panoptic training and evaluation.

The ops take one raw example (see `CocoPanopticSource`) and an explicit
`np.random.Generator`, so grain can derive the randomness from (seed, index,
epoch) and a resumed run repeats it exactly. Geometric ops move the image
(bilinear) and every label map (nearest) with one shared pixel-centre mapping,
so image and labels stay aligned pixel-exactly. The training chain is
flip -> large-scale jitter -> colour jitter -> labels to mask resolution ->
random instance ids -> small-instance loss weights (paper: instance ids are
random per image; weight (1/(c+1))**p per segment of c pixels). With
`stuff_identity='random'` (the reference) every stuff segment gets its own
random id too; with 'zero' stuff keeps id 0, one segment per stuff class.
Either way a segment is one (class, id) pair, so c is counted per segment.
Crowd regions keep their class with instance 0 and are weighted like any
other pixel; void pixels (semantic 0) stay in the loss as in the reference;
only padding gets weight 0. Both `preprocess_train` and `preprocess_eval`
return fixed shapes. Sizes are an int (a square) or a (height, width) pair
(`config_lib.size_hw`); images are scaled to fit the (height, width) box
keeping their aspect ratio, as the reference's scale jitter and eval resize.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pix2seq_d_jax import config_lib

Example = dict[str, Any]
# Spatial label maps moved together with the image by the geometric ops.
_LABEL_KEYS = ('semantic', 'instance', 'crowd', 'valid')


def _resize_window(
    image: np.ndarray,
    size: tuple[int, int],
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
  """Bilinear resize to `size`, computing only `window` (y, x, h, w) of it.

  PIL's `box` argument samples the source on the same pixel-centre grid as a
  full resize, so the window equals a crop of the full result (within one
  grey level) at a fraction of the cost when large-scale jitter upscales.
  """
  h, w = image.shape[:2]
  out_h, out_w = size
  oy, ox, ch, cw = (0, 0, out_h, out_w) if window is None else window
  if (out_h, out_w) == (h, w):
    return image[oy : oy + ch, ox : ox + cw].copy()
  sy, sx = h / out_h, w / out_w
  box = (ox * sx, oy * sy, (ox + cw) * sx, (oy + ch) * sy)
  if image.dtype == np.uint8 and image.shape[-1] == 3:
    pil = Image.fromarray(image, 'RGB')
    return np.asarray(pil.resize((cw, ch), Image.Resampling.BILINEAR, box=box))
  channels = [
      np.asarray(
          Image.fromarray(image[..., c].astype(np.float32), 'F').resize(
              (cw, ch), Image.Resampling.BILINEAR, box=box
          )
      )
      for c in range(image.shape[-1])
  ]
  return np.stack(channels, axis=-1).astype(image.dtype)


def resize_image(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """Bilinear resize (PIL, antialiased when shrinking).

  Args:
    image: uint8 or float32 [h, w, c].
    size: output (height, width), or an int for a square.

  Returns:
    [height, width, c] of the input dtype.
  """
  return _resize_window(image, config_lib.size_hw(size, 'resize_image size'))


def nearest_index(in_len: int, out_len: int) -> np.ndarray:
  """The input index each output pixel of a nearest resize reads.

  int [out_len]; composing these index arrays composes resizes exactly.
  """
  # Pixel-centre mapping (the one PIL's bilinear uses): output pixel i samples
  # input pixel floor((i + 0.5) * in / out), the rule of PIL's NEAREST and
  # tf.image.resize(method='nearest'). Integer arithmetic keeps it exact where
  # the float product would round across an integer.
  return ((2 * np.arange(out_len) + 1) * in_len) // (2 * out_len)


def resize_labels(x: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """Nearest-neighbour resize of a label map; never invents label values.

  The one label resize of the package: training preprocessing, the
  evaluators and predict all map label maps between sizes with it.

  Args:
    x: [h, w] or [h, w, c] of any dtype (ids, classes, bool masks).
    size: output (height, width), or an int for a square; positive.

  Returns:
    [height, width(, c)] of the input dtype.

  Raises:
    ValueError: on a bad rank, an empty input or a non-positive size.
  """
  x = np.asarray(x)
  out_h, out_w = config_lib.size_hw(size, 'resize_labels size')
  if x.ndim not in (2, 3):
    raise ValueError(
        f'resize_labels: expected [h, w] or [h, w, c], got shape {x.shape}.'
    )
  if out_h <= 0 or out_w <= 0 or x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(
        f'resize_labels: expected a positive size and a non-empty input, got '
        f'size {(out_h, out_w)} for labels of shape {x.shape}.'
    )
  rows = nearest_index(x.shape[0], out_h)
  cols = nearest_index(x.shape[1], out_w)
  return x[rows[:, None], cols[None, :]]


def _scaled_size(
    h: int, w: int, box: tuple[float, float]
) -> tuple[int, int]:
  """(h, w) scaled by one factor to fit the (height, width) `box`.

  The factor is min(box_h / h, box_w / w), the reference's aspect-keeping
  resize; for a square box it makes the longer side the box's side.
  """
  f = min(box[0] / h, box[1] / w)
  return max(int(round(h * f)), 1), max(int(round(w * f)), 1)


def _resize_crop_pad(
    example: Example,
    new_hw: tuple[int, int],
    offset: tuple[int, int],
    output_size: tuple[int, int],
) -> Example:
  """Resizes to new_hw, crops output_size (h, w) at offset, pads bottom/right.

  Only the crop window of the resized maps is computed.
  """
  out = dict(example)
  h, w = example['image'].shape[:2]
  if 'valid' not in out:
    out['valid'] = np.ones((h, w), np.bool_)
  (new_h, new_w), (oy, ox), (out_h, out_w) = new_hw, offset, output_size
  ch, cw = min(out_h, new_h - oy), min(out_w, new_w - ox)
  image = _resize_window(example['image'], new_hw, (oy, ox, ch, cw))
  padded = np.zeros((out_h, out_w) + image.shape[2:], image.dtype)
  padded[:ch, :cw] = image
  out['image'] = padded
  rows = nearest_index(h, new_h)[oy : oy + ch]
  cols = nearest_index(w, new_w)[ox : ox + cw]
  for key in _LABEL_KEYS:
    if key not in out:
      continue
    lab = np.take(np.take(out[key], rows, axis=0), cols, axis=1)
    pad = np.zeros((out_h, out_w) + lab.shape[2:], lab.dtype)
    pad[:ch, :cw] = lab
    out[key] = pad
  out['valid_size'] = np.array([ch, cw], np.int32)
  return out


def large_scale_jitter(
    example: Example,
    rng: np.random.Generator,
    *,
    output_size: int | Sequence[int],
    scale_range: tuple[float, float] = (1.0, 1.0),
) -> Example:
  """Large-scale jitter: random rescale, random crop, pad to the output size.

  With output (H, W) and s ~ U(scale_range), the image is scaled by one
  factor to fit (H * s, W * s) (for a square output: its longer side is
  H * s); a random (H, W) window is cropped where the result is larger, and
  the rest is padded at the bottom/right (image 0, semantic 0 = void,
  instance 0, crowd False, valid False).

  Args:
    example: dict with image uint8 [h, w, 3] and label maps semantic/instance
      int32 [h, w], crowd bool [h, w], optionally valid bool [h, w].
    rng: randomness source.
    output_size: (H, W) of the output, or an int for a square.
    scale_range: (min, max) of s.

  Returns:
    A new dict with the maps at [H, W], `valid` bool [H, W] (True on image
    content) and `valid_size` int32 [2] (content height, width); other keys
    are passed through.

  Raises:
    ValueError: on an invalid output_size or scale_range.
  """
  out_h, out_w = config_lib.size_hw(output_size, 'large_scale_jitter '
                                    'output_size')
  lo, hi = scale_range
  if not 0 < lo <= hi:
    raise ValueError(
        f'large_scale_jitter: need 0 < min <= max of scale_range, got '
        f'scale_range={scale_range}.'
    )
  h, w = example['image'].shape[:2]
  s = rng.uniform(lo, hi) if hi > lo else lo
  new_h, new_w = _scaled_size(h, w, (out_h * s, out_w * s))
  oy = int(rng.integers(0, max(new_h - out_h, 0) + 1))
  ox = int(rng.integers(0, max(new_w - out_w, 0) + 1))
  return _resize_crop_pad(
      example, (new_h, new_w), (oy, ox), (out_h, out_w))


def random_flip(example: Example, rng: np.random.Generator) -> Example:
  """Flips image and label maps left-right together with probability 0.5.

  Args:
    example: dict with image [h, w, 3] and optional semantic/instance/crowd/
      valid [h, w] maps; other keys pass through.
    rng: randomness source.

  Returns:
    A new dict (arrays copied only when flipped).
  """
  if rng.uniform() >= 0.5:
    return dict(example)
  out = dict(example)
  for key in ('image',) + _LABEL_KEYS:
    if key in out:
      out[key] = np.ascontiguousarray(out[key][:, ::-1])
  return out


def color_jitter(
    image: np.ndarray, rng: np.random.Generator, strength: float
) -> np.ndarray:
  """Random brightness, contrast and saturation (SimCLR-style magnitudes).

  Each factor is drawn from U(1 - 0.8 * strength, 1 + 0.8 * strength) and
  applied in random order; strength 0 returns the image unchanged.

  Args:
    image: float32 [h, w, 3] in [0, 1].
    rng: randomness source.
    strength: jitter strength >= 0.

  Returns:
    float32 [h, w, 3] clipped to [0, 1].

  Raises:
    ValueError: on a negative strength or a non-float image.
  """
  if strength < 0:
    raise ValueError(f'color_jitter strength must be >= 0, got {strength}.')
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(
        f'color_jitter expects a float image in [0, 1], got {image.dtype}.'
    )
  if strength == 0:
    return image.astype(np.float32, copy=True)
  x = image.astype(np.float32)
  lum = np.array([0.299, 0.587, 0.114], np.float32)
  spread = 0.8 * strength
  factors = np.maximum(rng.uniform(1 - spread, 1 + spread, size=3), 0.0)
  for op in rng.permutation(3):
    f = np.float32(factors[op])
    if op == 0:  # brightness
      x = x * f
    elif op == 1:  # contrast around the mean grey level
      mean = np.float32((x @ lum).mean())
      x = (x - mean) * f + mean
    else:  # saturation: blend with the per-pixel grey image
      grey = (x @ lum)[..., None]
      x = (x - grey) * f + grey
    x = np.clip(x, 0.0, 1.0)
  return x


# Value range up to which np.bincount (O(n)) replaces np.unique (a sort).
_BINCOUNT_LIMIT = 1 << 22


def _unique_inverse_counts(
    x: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """np.unique(x, return_inverse=True, return_counts=True), inverse shaped
  like x; linear time for the small non-negative ids of label maps."""
  flat = x.ravel()
  if flat.size and flat.min() >= 0 and flat.max() < _BINCOUNT_LIMIT:
    counts = np.bincount(flat)
    uniq = np.flatnonzero(counts)
    index = np.zeros(len(counts), np.int64)
    index[uniq] = np.arange(len(uniq))
    return uniq, index[flat].reshape(x.shape), counts[uniq]
  uniq, inverse, counts = np.unique(
      flat, return_inverse=True, return_counts=True
  )
  return uniq, inverse.reshape(x.shape), counts


def assign_random_instance_ids(
    instance: np.ndarray,
    rng: np.random.Generator,
    max_instances: int,
    *,
    semantic: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """Maps instance ids to distinct random ids in 1..max_instances-1.

  Pix2Seq-D assigns instance ids randomly per image, so the model cannot rely
  on an ordering. When an image has more instances than ids available, the
  smallest instances (ties: the larger original id) are dropped: their
  instance becomes 0 and their semantic becomes void, so they are not left as
  an unlabelled "stuff" region of a thing class.

  Args:
    instance: int [h, w], 0 = no instance.
    rng: randomness source.
    max_instances: ids are drawn from 1..max_instances-1 (>= 2).
    semantic: int [h, w] class map.

  Returns:
    (instance int32 [h, w], semantic int32 [h, w]).

  Raises:
    ValueError: if max_instances < 2 or the maps differ in shape.
  """
  if max_instances < 2:
    raise ValueError(f'max_instances must be >= 2, got {max_instances}.')
  if instance.shape != semantic.shape:
    raise ValueError(
        f'instance {instance.shape} and semantic {semantic.shape} differ.'
    )
  uniq, inverse, counts = _unique_inverse_counts(instance)
  nonzero = np.flatnonzero(uniq != 0)
  # Largest first; ids are ascending, so a stable sort keeps the smaller id
  # first among equal areas.
  by_area = nonzero[np.argsort(-counts[nonzero], kind='stable')]
  keep = by_area[: max_instances - 1]
  lut = np.zeros(len(uniq), np.int32)
  lut[keep] = rng.choice(
      np.arange(1, max_instances, dtype=np.int32),
      size=len(keep),
      replace=False,
  )
  new_instance = lut[inverse]
  new_semantic = semantic.astype(np.int32, copy=True)
  dropped = np.zeros(len(uniq), np.bool_)
  dropped[by_area[max_instances - 1 :]] = True
  new_semantic[dropped[inverse]] = 0
  return new_instance, new_semantic


def number_stuff_segments(
    semantic: np.ndarray, instance: np.ndarray, crowd: np.ndarray
) -> np.ndarray:
  """Gives each stuff class present its own instance id (before random ids).

  Stuff pixels are those with a class (semantic > 0), instance 0 and no
  crowd flag: the readers give instance 0 to stuff, crowd and void only, and
  a panoptic label has one segment per stuff class, so each class present is
  one segment. It gets id max(instance) + class, above every thing id, so
  `assign_random_instance_ids` then draws random ids for things and stuff
  alike (the reference's `stuff_identity='random'` target).

  Args:
    semantic: int [...] class map (0 = void).
    instance: int [...] instance ids, 0 on stuff, crowd and void.
    crowd: bool [...] crowd pixels (they keep instance 0).

  Returns:
    int32 [...] instance ids; thing, crowd and void pixels unchanged.
  """
  semantic = np.asarray(semantic)
  instance = np.asarray(instance)
  stuff = (semantic > 0) & (instance == 0) & ~np.asarray(crowd, bool)
  out = instance.astype(np.int32, copy=True)
  out[stuff] = int(instance.max(initial=0)) + semantic[stuff]
  return out


def loss_weights(
    semantic: np.ndarray,
    instance: np.ndarray,
    power: float,
    valid: np.ndarray | None = None,
) -> np.ndarray:
  """Per-pixel loss weights that up-weight small segments.

  Every pixel of one (semantic, instance) segment with c pixels gets
  (1 / (c + 1))**power; padding pixels (valid False) get 0 and are not
  counted; the weights are then scaled to sum to h * w (mean 1 over the whole
  map). Void pixels form one segment like any other.

  Args:
    semantic: int [h, w].
    instance: int [h, w].
    power: p >= 0; 0 gives uniform weights over valid pixels.
    valid: optional bool [h, w], False on padding.

  Returns:
    float32 [h, w] weights (all zero if no pixel is valid).
  """
  h, w = semantic.shape
  key = semantic.astype(np.int64) * (int(instance.max(initial=0)) + 1) + (
      instance.astype(np.int64)
  )
  if valid is None:
    valid = np.ones((h, w), np.bool_)
  _, inverse, counts = _unique_inverse_counts(key[valid])
  weights = np.zeros((h, w), np.float64)
  weights[valid] = (1.0 / (counts[inverse] + 1.0)) ** power
  total = weights.sum()
  if total > 0:
    weights *= (h * w) / total
  return weights.astype(np.float32)


def _check_stuff_identity(value: str) -> None:
  if value not in config_lib.STUFF_IDENTITIES:
    raise ValueError(
        f'stuff_identity={value!r}: expected one of '
        f'{list(config_lib.STUFF_IDENTITIES)} (config.input.stuff_identity).')


def _validate_sizes(
    image_size: int | Sequence[int], mask_size: int | Sequence[int]
) -> tuple[tuple[int, int], tuple[int, int]]:
  """Both sizes as (h, w); the image a multiple of the mask on each axis."""
  image = config_lib.size_hw(image_size, 'image_size')
  mask = config_lib.size_hw(mask_size, 'mask_size')
  for axis, s, m in zip(('height', 'width'), image, mask, strict=True):
    if s % m:
      raise ValueError(
          f'image_size={image_size!r}: the {axis} {s} must be a multiple of '
          f'mask_size={mask_size!r} on that axis ({m}).'
      )
  return image, mask


def _finish(
    ex: Example,
    raw: Example,
    image: np.ndarray,
    semantic: np.ndarray,
    instance: np.ndarray,
    weight: np.ndarray,
) -> Example:
  return {
      'image': image.astype(np.float32),
      'semantic': semantic.astype(np.int32),
      'instance': instance.astype(np.int32),
      'loss_weight': weight.astype(np.float32),
      'image_id': np.asarray(raw['image_id'], np.int32),
      'orig_size': np.array(raw['image'].shape[:2], np.int32),
      'valid_size': ex['valid_size'].astype(np.int32),
  }


def preprocess_train(
    raw: Example,
    rng: np.random.Generator,
    *,
    image_size: int | Sequence[int],
    mask_size: int | Sequence[int],
    max_instances: int,
    scale_range: tuple[float, float] = (1.0, 1.0),
    flip: bool = True,
    color_jitter_strength: float = 0.0,
    loss_weight_power: float = 0.2,
    stuff_identity: str = config_lib.STUFF_IDENTITY_DEFAULT,
) -> Example:
  """Training preprocessing of one raw example into fixed shapes.

  Args:
    raw: a `CocoPanopticSource` example.
    rng: randomness source (grain derives it from seed, index and epoch).
    image_size: (H, W) of the image, or an int for a square.
    mask_size: (h', w') of the label maps, or an int; H % h' == W % w' == 0.
    max_instances: instance ids are drawn from 1..max_instances-1.
    scale_range: large-scale jitter range of the scale s (the image is
      scaled to fit (H * s, W * s)).
    flip: random left-right flip.
    color_jitter_strength: 0 disables colour jitter.
    loss_weight_power: p of the small-instance weighting.
    stuff_identity: 'random' gives stuff segments random ids like things
      (`number_stuff_segments`), 'zero' keeps them at 0.

  Returns:
    image float32 [H, W, 3] in [0, 1]; semantic, instance int32 [h', w'];
    loss_weight float32 [h', w']; image_id int32 []; orig_size int32 [2]
    (raw h, w); valid_size int32 [2] (content h, w inside the padded H x W
    image).

  Raises:
    ValueError: if a size is malformed, H, W are not multiples of h', w' or
      stuff_identity is unknown.
  """
  image_size, mask_size = _validate_sizes(image_size, mask_size)
  _check_stuff_identity(stuff_identity)
  ex = {k: raw[k] for k in ('image', 'semantic', 'instance', 'crowd')}
  if flip:
    ex = random_flip(ex, rng)
  ex = large_scale_jitter(
      ex, rng, output_size=image_size, scale_range=scale_range
  )
  image = color_jitter(
      ex['image'].astype(np.float32) / 255.0, rng, color_jitter_strength
  )
  semantic = resize_labels(ex['semantic'], mask_size)
  instance = resize_labels(ex['instance'], mask_size)
  valid = resize_labels(ex['valid'], mask_size)
  if stuff_identity == 'random':
    instance = number_stuff_segments(
        semantic, instance, resize_labels(ex['crowd'], mask_size))
  # Ids are assigned at mask resolution so instances that vanish there do not
  # take an id, and the overflow rule sees the areas the model is trained on.
  instance, semantic = assign_random_instance_ids(
      instance, rng, max_instances, semantic=semantic
  )
  weight = loss_weights(semantic, instance, loss_weight_power, valid)
  return _finish(ex, raw, image, semantic, instance, weight)


def preprocess_train_clip(
    raw: Example,
    rng: np.random.Generator,
    *,
    proceeding_frames: Sequence[int],
    image_size: int | Sequence[int],
    mask_size: int | Sequence[int],
    max_instances: int,
    scale_range: tuple[float, float] = (1.0, 1.0),
    flip: bool = True,
    color_jitter_strength: float = 0.0,
    loss_weight_power: float = 0.2,
    stuff_identity: str = config_lib.STUFF_IDENTITY_DEFAULT,
) -> Example:
  """Training preprocessing of a video clip: the last frame is the target.

  Every frame of the clip gets the same flip, jitter and colour change (each
  frame replays the same random draws), and instance ids are assigned once
  over the whole clip, so an object keeps its (random) id in every frame.

  Args:
    raw: a clip of L frames: image uint8 [L, H, W, 3], semantic / instance
      int32 and crowd bool [L, H, W] (a video source's example), with
      L > max(-f for f in proceeding_frames).
    rng: randomness source.
    proceeding_frames: negative offsets of the conditioning frames relative
      to the last (target) frame, e.g. (-2, -1).
    image_size, mask_size, max_instances, scale_range, flip,
    color_jitter_strength, loss_weight_power, stuff_identity: as
    `preprocess_train` (a stuff class keeps one id over the clip).

  Returns:
    The target frame's fields as `preprocess_train` returns them, plus
    cond_semantic / cond_instance int32 [F, h', w'], the ground-truth maps
    of the conditioning frames in `proceeding_frames` order.

  Raises:
    ValueError: if the clip is too short for `proceeding_frames` or the
      image size is not a multiple of the mask size.
  """
  image_size, mask_size = _validate_sizes(image_size, mask_size)
  _check_stuff_identity(stuff_identity)
  length = raw['image'].shape[0]
  frames = tuple(proceeding_frames)
  if not frames or length <= max(-f for f in frames):
    raise ValueError(
        f'preprocess_train_clip: a clip of {length} frames cannot condition '
        f'on proceeding_frames={frames}.')
  state = rng.bit_generator.state
  images, semantics, instances, valids, crowds = [], [], [], [], []
  for i in range(length):
    frame_rng = np.random.Generator(type(rng.bit_generator)())
    frame_rng.bit_generator.state = state
    ex = {k: raw[k][i] for k in ('image', 'semantic', 'instance', 'crowd')}
    if flip:
      ex = random_flip(ex, frame_rng)
    ex = large_scale_jitter(
        ex, frame_rng, output_size=image_size, scale_range=scale_range
    )
    images.append(color_jitter(
        ex['image'].astype(np.float32) / 255.0, frame_rng,
        color_jitter_strength,
    ))
    semantics.append(resize_labels(ex['semantic'], mask_size))
    instances.append(resize_labels(ex['instance'], mask_size))
    valids.append(resize_labels(ex['valid'], mask_size))
    crowds.append(resize_labels(ex['crowd'], mask_size))
  instance = np.concatenate(instances)
  semantic = np.concatenate(semantics)
  if stuff_identity == 'random':
    instance = number_stuff_segments(
        semantic, instance, np.concatenate(crowds))
  # The generator moves on past the replayed draws, then ids are assigned
  # jointly: the frames stacked as one tall map share one id table.
  rng.bit_generator.state = frame_rng.bit_generator.state
  instance, semantic = assign_random_instance_ids(
      instance, rng, max_instances, semantic=semantic)
  instance = instance.reshape(length, *mask_size)
  semantic = semantic.reshape(length, *mask_size)
  weight = loss_weights(
      semantic[-1], instance[-1], loss_weight_power, valids[-1])
  target = {'image': raw['image'][-1], 'image_id': raw['image_id']}
  out = _finish(ex, target, images[-1], semantic[-1], instance[-1], weight)
  cond = [length - 1 + f for f in frames]
  out['cond_semantic'] = semantic[cond].astype(np.int32)
  out['cond_instance'] = instance[cond].astype(np.int32)
  return out


def preprocess_eval(
    raw: Example,
    *,
    image_size: int | Sequence[int],
    mask_size: int | Sequence[int],
    loss_weight_power: float = 0.2,
) -> Example:
  """Deterministic evaluation preprocessing into fixed shapes.

  The image is resized keeping its aspect ratio to fit the (H, W) image
  size (for a square: the longer side is H), then padded at the
  bottom/right; label maps follow with nearest neighbour; instance ids are
  kept as read (no random ids, no overflow dropping).

  Args:
    raw: a `CocoPanopticSource` example.
    image_size: (H, W), or an int for a square.
    mask_size: (h', w'), or an int; H % h' == W % w' == 0.
    loss_weight_power: p for `loss_weight` (eval losses).

  Returns:
    The same fields and shapes as `preprocess_train`.

  Raises:
    ValueError: if a size is malformed or H, W are not multiples of h', w'.
  """
  image_size, mask_size = _validate_sizes(image_size, mask_size)
  ex = {k: raw[k] for k in ('image', 'semantic', 'instance', 'crowd')}
  h, w = ex['image'].shape[:2]
  ex = _resize_crop_pad(
      ex, _scaled_size(h, w, image_size), (0, 0), image_size
  )
  semantic = resize_labels(ex['semantic'], mask_size)
  instance = resize_labels(ex['instance'], mask_size)
  valid = resize_labels(ex['valid'], mask_size)
  weight = loss_weights(semantic, instance, loss_weight_power, valid)
  image = ex['image'].astype(np.float32) / 255.0
  return _finish(ex, raw, image, semantic, instance, weight)
