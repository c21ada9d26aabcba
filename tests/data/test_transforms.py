"""Geometry of transforms.preprocess, checked by box arithmetic and by what the pixels show."""

import numpy as np
import pytest
import tensorflow as tf

from retinanet_jax.data import config as config_lib
from retinanet_jax.data import transforms


def _config(**overrides) -> transforms.TransformConfig:
  c = config_lib.default_data_config()
  c.pad_multiple = 32
  c.max_boxes = 4
  c.hflip_prob = 0.0
  for key, value in overrides.items():
    c[key] = value
  return transforms.TransformConfig.from_data_config(c)


def _example(image, boxes, labels=None):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  return {
      "image": tf.constant(image, tf.uint8),
      "boxes": tf.constant(boxes),
      "labels": tf.constant(np.arange(n) if labels is None else labels, tf.int32),
      "is_crowd": tf.zeros([n], tf.bool),
      "image_id": tf.constant(7, tf.int64),
      "original_hw": tf.constant(image.shape[:2], tf.int32),
  }


def _run(example, config, *, train, seed=0):
  out = transforms.preprocess(example, config=config, train=train,
                              seed=tf.constant([seed, 1], tf.int64))
  return {k: v.numpy() for k, v in out.items()}


def test_resize_short_side_to_s_and_long_side_at_most_l():
  # 100x200, S=50, L=80: scale = min(50/100, 80/200) = 0.4 -> 40x80, padded to 96x96.
  config = _config(train_min_size_range=(50, 50), eval_min_size=50, max_size=80)
  out = _run(_example(np.zeros((100, 200, 3)), [[20, 10, 120, 60]]), config, train=False)
  assert out["image"].shape == (96, 96, 3)
  np.testing.assert_array_equal(out["image_hw"], [40, 80])
  np.testing.assert_allclose(out["scale"], [0.4, 0.4])
  np.testing.assert_allclose(out["boxes"][0], [8, 4, 48, 24], rtol=1e-6)
  np.testing.assert_array_equal(out["box_mask"], [True, False, False, False])
  assert out["image_id"] == 7


def test_resize_scale_is_the_exact_per_axis_ratio_and_maps_back():
  # 30x47, S=20: scale 2/3 -> (20, round(31.33) = 31); x is scaled by 31/47, y by 20/30.
  config = _config(eval_min_size=20, max_size=1000)
  original = np.array([[4.7, 3.0, 40.0, 27.0]], np.float32)
  out = _run(_example(np.zeros((30, 47, 3)), original), config, train=False)
  np.testing.assert_array_equal(out["image_hw"], [20, 31])
  np.testing.assert_allclose(out["scale"], [20 / 30, 31 / 47], rtol=1e-6)
  sy, sx = out["scale"]
  np.testing.assert_allclose(out["boxes"][0] / [sx, sy, sx, sy], original[0], rtol=1e-5)


def test_training_short_side_is_drawn_from_the_range_and_fixed_by_the_seed():
  config = _config(train_min_size_range=(20, 24), max_size=1000)
  example = _example(np.zeros((10, 15, 3)), [[0, 0, 5, 5]])
  shorts = [_run(example, config, train=True, seed=s)["image_hw"][0] for s in range(40)]
  assert set(shorts) == {20, 21, 22, 23, 24}
  assert _run(example, config, train=True, seed=3)["image_hw"][0] == shorts[3]


def test_horizontal_flip_mirrors_pixels_and_boxes():
  # No resize (S = h, L = w); left half red, right half blue; box on the left quarter.
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, :40] = (255, 0, 0)
  image[:, 40:] = (0, 0, 255)
  config = _config(train_min_size_range=(40, 40), max_size=80, hflip_prob=1.0)
  out = _run(_example(image, [[8, 4, 28, 24]]), config, train=True)
  np.testing.assert_allclose(out["boxes"][0], [80 - 28, 4, 80 - 8, 24])
  np.testing.assert_array_equal(out["image"][:40, :80], image[:, ::-1])
  assert not out["image"][40:].any() and not out["image"][:, 80:].any()


def test_lsj_crop_keeps_boxes_on_their_pixels():
  # 64x16 grey image with a red square at box [4, 4, 12, 12]; scale range (2, 2) -> 128x32, then a
  # random 64-row window (offset 0..64): the square is kept when the offset is below 24 and
  # dropped (and counted) otherwise. Flip on for odd seeds.
  image = np.full((64, 16, 3), 100, np.uint8)
  image[4:12, 4:12] = (255, 0, 0)
  outcomes = set()
  for seed in range(16):
    config = _config(mode="lsj", image_size=64, scale_range=(2.0, 2.0),
                     hflip_prob=float(seed % 2))
    out = _run(_example(image, [[4, 4, 12, 12], [0, 0, 16, 64]]), config, train=True, seed=seed)
    np.testing.assert_array_equal(out["image_hw"], [64, 32])
    np.testing.assert_allclose(out["boxes"][out["box_mask"]][-1], [0, 0, 32, 64])  # whole image
    red = (out["image"] == [255, 0, 0]).all(axis=-1)
    if out["box_mask"].sum() == 2:  # the red square survived the crop
      outcomes.add("kept")
      x1, y1, x2, y2 = out["boxes"][0]
      assert x2 - x1 == 16 and x1 == (8 if seed % 2 == 0 else 32 - 24)
      assert red[int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1].all()
      # No red pixel outside the box (1 px margin for interpolation).
      outside = red.copy()
      outside[max(int(y1) - 1, 0):int(y2) + 1, int(x1) - 1:int(x2) + 1] = False
      assert not outside.any()
    else:
      outcomes.add("dropped")
      assert out["num_dropped_boxes"] == 1 and not red.any()
  assert outcomes == {"kept", "dropped"}


def test_lsj_eval_fits_the_image_without_cropping():
  config = _config(mode="lsj", image_size=64)
  out = _run(_example(np.zeros((64, 32, 3)), [[0, 0, 32, 64]]), config, train=False)
  np.testing.assert_array_equal(out["image_hw"], [64, 32])
  np.testing.assert_allclose(out["scale"], [1, 1])
  assert out["image"].shape == (64, 64, 3)


def test_degenerate_boxes_are_dropped_and_extra_boxes_truncated_and_counted():
  config = _config(eval_min_size=40, max_size=80, max_boxes=2, min_box_side=1.0)
  boxes = [[5, 5, 5, 9],      # zero width: dropped
           [1, 1, 1.5, 9],    # 0.5 px wide <= min_box_side: dropped
           [-3, 2, 10, 10],   # clipped to [0, 2, 10, 10], kept
           [70, 30, 90, 50],  # clipped to [70, 30, 80, 40], kept
           [2, 2, 6, 6]]      # the third kept box: truncated
  out = _run(_example(np.zeros((40, 80, 3)), boxes), config, train=False)
  assert out["num_dropped_boxes"] == 2 and out["num_truncated_boxes"] == 1
  np.testing.assert_allclose(out["boxes"], [[0, 2, 10, 10], [70, 30, 80, 40]])
  np.testing.assert_array_equal(out["labels"], [2, 3])
  np.testing.assert_array_equal(out["box_mask"], [True, True])


def test_padded_hw_is_a_multiple_of_pad_multiple():
  assert transforms.padded_hw(_config(max_size=1333, pad_multiple=128)) == (1408, 1408)
  assert transforms.padded_hw(_config(mode="lsj", image_size=640, pad_multiple=128)) == (640, 640)
  assert transforms.padded_hw(_config(mode="lsj", image_size=100, pad_multiple=32)) == (128, 128)
