"""tf.data transforms: one decoded Example -> one padded, fixed-shape network input (on the host).

Geometry (all boxes `[x1, y1, x2, y2]` float32 pixels; `h0, w0` original size, `s` a scale):
* resize mode: short side -> S (train: uniform integer in `train_min_size_range`; eval:
  `eval_min_size`), long side at most `max_size`: `s = min(S / min(h0, w0), max_size / max(h0, w0))`,
  new size `(round(h0 s), round(w0 s))`.
* lsj mode (large-scale jitter): target `t = image_size * u`, `u ~ U(scale_range)` (eval: u = 1),
  `s = min(t / h0, t / w0)`; then a random `image_size x image_size` window of the resized image
  (train) or its top-left corner (eval); an image smaller than the window is not cropped.
* Resizing is bilinear with half-pixel centres and no antialiasing (torchvision's
  `interpolate(mode="bilinear")`), so pixel centre `c` of the original lands at `(c + 0.5) * s' - 0.5`
  with `s' = new / old` per axis, and a box corner `x` lands at `x * s'`. Boxes are scaled by the
  per-axis `s'` (exact ratio of integer sizes), shifted by the crop offset, clipped to the output and
  dropped when a side is <= `min_box_side`.
* fixed mode (`fixed_resize`): every image resized to `image_size x image_size` whatever its aspect
  ratio (mmdetection's `Resize(scale=(S, S), keep_ratio=False)`, SARDet-100K's 800x800), boxes scaled
  per axis by `(S / w0, S / h0)`; the rest (clip, drop, flip, padding) as in resize mode. `scale` is
  then `(S / h0, S / w0)`, so evaluation maps boxes back per axis.
* Horizontal flip (train, probability `hflip_prob`) of the valid region of width `w`:
  `x1' = w - x2, x2' = w - x1`.
* The image is zero-padded at the bottom/right to the static `padded_hw(config)` (by the caller while
  batching with `ImagePadding.VALID`); boxes are padded
  to `max_boxes` rows (first `max_boxes` kept) with `box_mask`.

Randomness is stateless: every draw is a function of the example's `seed` ([2] int64), so a
pipeline position always gets the same augmentation (this is what makes iterator restore exact).
Non-finite pixel values (NaN/inf after a transform) are set to 0 before the uint8 cast and counted;
boxes with a non-finite coordinate are dropped as degenerate.
Output keys: the batch table of docs/design.md (without `example_mask`) plus `num_dropped_boxes`,
`num_truncated_boxes` and `num_nonfinite_pixels` (int32 scalars, counted by the input pipeline,
never sent to devices).
"""

from __future__ import annotations

import dataclasses
import enum
import math

import ml_collections
import tensorflow as tf


class Mode(enum.Enum):
  RESIZE = "resize"
  LSJ = "lsj"
  FIXED = "fixed"


class ImagePadding(enum.Enum):
  """What `preprocess` returns as "image".

  PADDED: zero-padded to the static `padded_hw(config)` (every image of a batch has one shape).
  VALID: only the valid region uint8 [h, w, 3] (`image_hw`); the caller pads, e.g. tf.data's
    `padded_batch(..., padded_shapes=...)`, which writes each image into the zeroed batch once
    instead of padding it first and copying it into the batch second (the same bytes).
  """

  PADDED = "padded"
  VALID = "valid"


@dataclasses.dataclass(frozen=True)
class TransformConfig:
  """The geometry fields of the data config (see config.py for each one's meaning)."""

  mode: Mode
  train_min_size_range: tuple[int, int]
  eval_min_size: int
  max_size: int
  image_size: int
  scale_range: tuple[float, float]
  pad_multiple: int
  hflip_prob: float
  max_boxes: int
  min_box_side: float

  @classmethod
  def from_data_config(cls, c: ml_collections.ConfigDict) -> "TransformConfig":
    lo, hi = (int(v) for v in c.train_min_size_range)
    if not 0 < lo <= hi:
      raise ValueError(f"train_min_size_range must be 0 < lo <= hi, got {(lo, hi)}")
    slo, shi = (float(v) for v in c.scale_range)
    if not 0 < slo <= shi:
      raise ValueError(f"scale_range must be 0 < lo <= hi, got {(slo, shi)}")
    if c.pad_multiple < 1 or c.max_boxes < 1:
      raise ValueError(f"pad_multiple and max_boxes must be >= 1, got {c.pad_multiple}, "
                       f"{c.max_boxes}")
    return cls(mode=Mode(c.mode), train_min_size_range=(lo, hi),
               eval_min_size=int(c.eval_min_size), max_size=int(c.max_size),
               image_size=int(c.image_size), scale_range=(slo, shi),
               pad_multiple=int(c.pad_multiple), hflip_prob=float(c.hflip_prob),
               max_boxes=int(c.max_boxes), min_box_side=float(c.min_box_side))


def padded_hw(config: TransformConfig) -> tuple[int, int]:
  """Static (H, W) of every image of a batch."""
  side = config.max_size if config.mode == Mode.RESIZE else config.image_size
  side = int(math.ceil(side / config.pad_multiple) * config.pad_multiple)
  return side, side


def _uniform(seed, minval, maxval, dtype=tf.float32):
  return tf.random.stateless_uniform([], seed=seed, minval=minval, maxval=maxval, dtype=dtype)


def _resize(image: tf.Tensor, hw: tf.Tensor) -> tf.Tensor:
  """Bilinear resize to hw (int32 [2]) as float32; a no-op resize is skipped.

  The same values either way (uint8 -> float32 is exact): ResizeBilinear on float32 input runs ~2x
  faster per output pixel than on uint8, so the input is cast first unless the output has fewer
  than half its pixels (then the cast costs more than it saves).
  """
  in_hw = tf.shape(image)[:2]
  same = tf.reduce_all(tf.equal(in_hw, hw))
  cast_first = 2 * tf.reduce_prod(tf.cast(hw, tf.int64)) >= tf.reduce_prod(tf.cast(in_hw, tf.int64))
  resize = lambda x: tf.image.resize(x, hw, method="bilinear", antialias=False)
  return tf.cond(same, lambda: tf.cast(image, tf.float32),
                 lambda: tf.cond(cast_first, lambda: resize(tf.cast(image, tf.float32)),
                                 lambda: resize(image)))


def _round_to_uint8(image: tf.Tensor) -> tf.Tensor:
  """float32 -> uint8: round half to even, then clip to [0, 255] (NaN must be removed first).

  The bytes of `tf.saturate_cast(tf.round(x), tf.uint8)` in one fused kernel instead of three passes
  over the image: QuantizeV2 in SCALED mode is documented as `round(min(max_range, max(min_range,
  x)) * scale_factor)` with, for quint8, `scale_factor = 255 / max_range` = 1 here.
  """
  out = tf.raw_ops.QuantizeV2(input=image, min_range=tf.constant(0.0), max_range=tf.constant(255.0),
                              T=tf.quint8, mode="SCALED", round_mode="HALF_TO_EVEN")
  return tf.bitcast(out.output, tf.uint8)


def _zero_pad(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """uint8 [h, w, 3] -> [height, width, 3], zeros below and to the right (h <= height, w <= width)."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  tf.debugging.assert_less_equal(tf.stack([h, w]), tf.constant([height, width]),
                                 message="image larger than the padded size")
  image = tf.concat([image, tf.zeros(tf.stack([h, width - w, 3]), image.dtype)], axis=1)
  image = tf.concat([image, tf.zeros(tf.stack([height - h, width, 3]), image.dtype)], axis=0)
  return tf.ensure_shape(image, [height, width, 3])


def preprocess(example: dict, *, config: TransformConfig, train: bool, seed: tf.Tensor,
               image_padding: ImagePadding = ImagePadding.PADDED) -> dict:
  """Example (sources.py) -> fixed-shape features (see the module docstring).

  Args:
    example: image uint8 [h0, w0, 3], boxes float32 [N, 4] original pixels, labels int32 [N],
      is_crowd bool [N], image_id int64 [], original_hw int32 [2].
    config: the geometry.
    train: random scale/crop/flip when True; deterministic eval geometry when False.
    seed: int64 [2], stateless seed of this example (ignored when train is False).
    image_padding: PADDED: "image" uint8 [H, W, 3] with (H, W) = padded_hw(config); VALID: uint8
      [h, w, 3] with (h, w) = image_hw, for a caller that pads while batching.
  """
  if config.mode == Mode.FIXED:
    return fixed_resize(example, config=config, train=train, seed=seed)
  image, boxes = example["image"], example["boxes"]
  h0 = tf.cast(example["original_hw"][0], tf.float32)
  w0 = tf.cast(example["original_hw"][1], tf.float32)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)

  if config.mode == Mode.RESIZE:
    if train:
      lo, hi = config.train_min_size_range
      short = tf.cast(_uniform(seeds[0], lo, hi + 1, tf.int32), tf.float32)
    else:
      short = tf.constant(config.eval_min_size, tf.float32)
    scale = tf.minimum(short / tf.minimum(h0, w0), config.max_size / tf.maximum(h0, w0))
  else:
    u = _uniform(seeds[0], *config.scale_range) if train else tf.constant(1.0)
    target = config.image_size * u
    scale = tf.minimum(target / h0, target / w0)
  new_hw = tf.maximum(tf.cast(tf.round(tf.stack([h0, w0]) * scale), tf.int32), 1)
  new_hf = tf.cast(new_hw, tf.float32)
  scale_yx = new_hf / tf.stack([h0, w0])  # exact per-axis ratio
  image = _resize(image, new_hw)
  boxes = boxes * tf.stack([scale_yx[1], scale_yx[0], scale_yx[1], scale_yx[0]])

  out_hw = new_hw
  if config.mode == Mode.LSJ:
    out_hw = tf.minimum(new_hw, config.image_size)
    if train:
      oy = _uniform(seeds[1], 0, new_hw[0] - out_hw[0] + 1, tf.int32)
      ox = _uniform(seeds[2], 0, new_hw[1] - out_hw[1] + 1, tf.int32)
      image = image[oy:oy + out_hw[0], ox:ox + out_hw[1]]
      offset = tf.cast(tf.stack([ox, oy, ox, oy]), tf.float32)
      boxes = boxes - offset
    else:
      image = image[:out_hw[0], :out_hw[1]]
  out_hf = tf.cast(out_hw, tf.float32)

  # Clip to the valid region, drop degenerate boxes.
  limits = tf.stack([out_hf[1], out_hf[0], out_hf[1], out_hf[0]])
  boxes = tf.clip_by_value(boxes, 0.0, limits)
  keep = tf.logical_and(boxes[:, 2] - boxes[:, 0] > config.min_box_side,
                        boxes[:, 3] - boxes[:, 1] > config.min_box_side)
  num_dropped = tf.reduce_sum(tf.cast(tf.logical_not(keep), tf.int32))
  boxes = tf.boolean_mask(boxes, keep)
  labels = tf.boolean_mask(example["labels"], keep)
  is_crowd = tf.boolean_mask(example["is_crowd"], keep)

  # Non-finite pixels (a transform gone wrong) would become arbitrary bytes in the uint8 cast: set
  # them to 0 and count them. The sum is finite exactly when no pixel is NaN/inf (or the values
  # are huge, then counted the slow way too): one reduction instead of a mask and a select per pixel.
  num_nonfinite = tf.cond(
      tf.math.is_finite(tf.reduce_sum(image)), lambda: tf.constant(0, tf.int32),
      lambda: tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(image)), tf.int32)))
  image = tf.cond(num_nonfinite > 0,
                  lambda: tf.where(tf.math.is_finite(image), image, tf.zeros_like(image)),
                  lambda: image)
  image = _round_to_uint8(image)  # = saturate_cast(round(x)): clip(round(x), 0, 255)

  if train and config.hflip_prob > 0:  # flipped as uint8 (the same bytes, a quarter of the data)
    flip = _uniform(seeds[3], 0.0, 1.0) < config.hflip_prob
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    flipped = tf.stack([out_hf[1] - boxes[:, 2], boxes[:, 1],
                        out_hf[1] - boxes[:, 0], boxes[:, 3]], axis=1)
    boxes = tf.cond(flip, lambda: flipped, lambda: boxes)

  # Fixed shapes: zeros concatenated at the bottom/right (tf.pad on uint8 is ~6x slower).
  if ImagePadding(image_padding) == ImagePadding.PADDED:
    pad_h, pad_w = padded_hw(config)
    image = _zero_pad(image, pad_h, pad_w)
  m = config.max_boxes
  count = tf.shape(boxes)[0]
  num_truncated = tf.maximum(count - m, 0)
  kept = tf.minimum(count, m)
  pad = [[0, m - kept]]
  return {
      "image": image,
      "image_hw": out_hw,
      "boxes": tf.reshape(tf.pad(boxes[:m], pad + [[0, 0]]), [m, 4]),
      "labels": tf.reshape(tf.pad(labels[:m], pad), [m]),
      "box_mask": tf.range(m) < kept,
      "is_crowd": tf.reshape(tf.pad(is_crowd[:m], pad), [m]),
      "image_id": tf.cast(example["image_id"], tf.int32),
      "scale": scale_yx,
      "num_dropped_boxes": num_dropped,
      "num_truncated_boxes": num_truncated,
      "num_nonfinite_pixels": num_nonfinite,
  }


def fixed_resize(example: dict, *, config: TransformConfig, train: bool, seed: tf.Tensor) -> dict:
  """`preprocess` in fixed mode: the image stretched to `image_size x image_size` (aspect ratio not
  kept), boxes scaled per axis; then resize mode's steps on an image already at its size (its scale
  is 1 there, so clipping, dropping, the flip and the padding are resize mode's own code), with
  `scale` the per-axis factors `(S / h0, S / w0)` (float32 [2]) of this resize."""
  side = config.image_size
  h0 = tf.cast(example["original_hw"][0], tf.float32)
  w0 = tf.cast(example["original_hw"][1], tf.float32)
  scale_yx = tf.constant([side, side], tf.float32) / tf.stack([h0, w0])
  image = _resize(example["image"], tf.constant([side, side], tf.int32))
  boxes = example["boxes"] * tf.stack([scale_yx[1], scale_yx[0], scale_yx[1], scale_yx[0]])
  at_size = dataclasses.replace(config, mode=Mode.RESIZE, train_min_size_range=(side, side),
                                eval_min_size=side, max_size=side)
  out = preprocess({**example, "image": image, "boxes": boxes,
                    "original_hw": tf.constant([side, side], tf.int32)},
                   config=at_size, train=train, seed=seed)
  return {**out, "scale": scale_yx}
