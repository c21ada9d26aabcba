"""The pre-speed-up transforms.preprocess (commit e81a467), kept verbatim below this docstring as
the reference that tests/data/test_transforms_reference.py compares the faster one with, byte for
byte. Do not edit: it documents what the batches were."""

from __future__ import annotations

import dataclasses
import enum
import math

import ml_collections
import tensorflow as tf


class Mode(enum.Enum):
  RESIZE = "resize"
  LSJ = "lsj"


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
  """Bilinear resize to hw (int32 [2]) as float32; a no-op resize is skipped."""
  same = tf.reduce_all(tf.equal(tf.shape(image)[:2], hw))
  return tf.cond(same, lambda: tf.cast(image, tf.float32),
                 lambda: tf.image.resize(image, hw, method="bilinear", antialias=False))


def preprocess(example: dict, *, config: TransformConfig, train: bool, seed: tf.Tensor) -> dict:
  """Example (sources.py) -> fixed-shape features (see the module docstring).

  Args:
    example: image uint8 [h0, w0, 3], boxes float32 [N, 4] original pixels, labels int32 [N],
      is_crowd bool [N], image_id int64 [], original_hw int32 [2].
    config: the geometry.
    train: random scale/crop/flip when True; deterministic eval geometry when False.
    seed: int64 [2], stateless seed of this example (ignored when train is False).
  """
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

  if train and config.hflip_prob > 0:
    flip = _uniform(seeds[3], 0.0, 1.0) < config.hflip_prob
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    flipped = tf.stack([out_hf[1] - boxes[:, 2], boxes[:, 1],
                        out_hf[1] - boxes[:, 0], boxes[:, 3]], axis=1)
    boxes = tf.cond(flip, lambda: flipped, lambda: boxes)

  # Non-finite pixels (a transform gone wrong) would become arbitrary bytes in the uint8 cast: set
  # them to 0 and count them.
  finite = tf.math.is_finite(image)
  num_nonfinite = tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.int32))
  image = tf.where(finite, image, tf.zeros_like(image))

  # Fixed shapes.
  pad_h, pad_w = padded_hw(config)
  image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
  image = tf.image.pad_to_bounding_box(image, 0, 0, pad_h, pad_w)
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
