"""transforms.fixed_resize (data.mode='fixed', SARDet's keep_ratio=False): pixels against torch's
bilinear resize, boxes and their way back to original pixels against float64 NumPy."""

import numpy as np
import tensorflow as tf
import torch

from retinanet_jax import evaluation
from retinanet_jax.data import config as config_lib
from retinanet_jax.data import transforms

SIDE = 64


def _config(**overrides) -> transforms.TransformConfig:
  c = config_lib.default_data_config()
  c.mode, c.image_size, c.pad_multiple, c.max_boxes, c.hflip_prob = "fixed", SIDE, 48, 4, 0.0
  for key, value in overrides.items():
    c[key] = value
  return transforms.TransformConfig.from_data_config(c)


def _run(image, boxes, config, *, train, seed=0):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  example = {"image": tf.constant(image, tf.uint8), "boxes": tf.constant(boxes),
             "labels": tf.range(len(boxes), dtype=tf.int32),
             "is_crowd": tf.zeros([len(boxes)], tf.bool), "image_id": tf.constant(3, tf.int64),
             "original_hw": tf.constant(image.shape[:2], tf.int32)}
  out = transforms.preprocess(example, config=config, train=train,
                              seed=tf.constant([seed, 1], tf.int64))
  return {k: v.numpy() for k, v in out.items()}


def test_fixed_resize_stretches_pixels_and_boxes_per_axis():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 91, 3), dtype=np.uint8)  # wide: x shrinks, y grows
  boxes = np.array([[4.5, 3.0, 80.25, 30.0], [0.0, 0.0, 91.0, 37.0]])
  config = _config()
  out = _run(image, boxes, config, train=False)
  assert transforms.padded_hw(config) == (96, 96) and out["image"].shape == (96, 96, 3)
  np.testing.assert_array_equal(out["image_hw"], [SIDE, SIDE])
  np.testing.assert_allclose(out["scale"], [SIDE / 37, SIDE / 91], rtol=1e-7)
  expected = boxes * np.array([SIDE / 91, SIDE / 37, SIDE / 91, SIDE / 37])  # float64
  np.testing.assert_allclose(out["boxes"][:2], expected, rtol=1e-6)
  reference = torch.nn.functional.interpolate(
      torch.from_numpy(image).permute(2, 0, 1)[None].double(), size=(SIDE, SIDE), mode="bilinear",
      align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
  got = out["image"][:SIDE, :SIDE].astype(np.float64)
  assert np.abs(got - np.clip(np.round(reference), 0, 255)).max() <= 1  # rounding of float32
  assert not out["image"][SIDE:].any() and not out["image"][:, SIDE:].any()


def test_detections_map_back_to_original_pixels_exactly():
  """Network-pixel boxes through `detections_to_coco` with the pipeline's `scale`, against the
  float64 inverse of the stretch: x * w0 / S, y * h0 / S."""
  rng = np.random.default_rng(1)
  for h0, w0 in [(37, 91), (500, 333), (1080, 1920)]:
    out = _run(np.zeros((h0, w0, 3), np.uint8), [[0, 0, 1, 1]], _config(), train=False)
    xy = np.sort(rng.uniform(0, SIDE, (5, 2, 2)), axis=1)  # [D, corner, (x, y)]
    net = np.concatenate([xy[:, 0], xy[:, 1]], axis=-1).astype(np.float32)  # [x1, y1, x2, y2]
    results = evaluation.detections_to_coco(
        image_ids=[3], boxes=net[None], scores=np.ones((1, 5)), classes=np.zeros((1, 5), int),
        valid=np.ones((1, 5), bool), category_ids=[1], scale=out["scale"][None])
    back = np.array([r["bbox"] for r in results])
    n = net.astype(np.float64)
    x1, y1 = n[:, 0] * w0 / SIDE, n[:, 1] * h0 / SIDE
    expected = np.stack([x1, y1, n[:, 2] * w0 / SIDE - x1, n[:, 3] * h0 / SIDE - y1], axis=1)
    # float32 scale: a relative error of at most 2^-24 per factor, i.e. < 1e-4 px at 1920 px.
    np.testing.assert_allclose(back, expected, rtol=0, atol=2e-7 * max(h0, w0))


def test_fixed_training_flips_in_the_stretched_frame_and_ignores_the_scale_range():
  image = np.zeros((37, 91, 3), np.uint8)
  image[:, :30] = 255
  config = _config(hflip_prob=1.0, scale_range=(0.1, 3.0))
  out = _run(image, [[9.1, 3.7, 27.3, 33.3]], config, train=True)
  np.testing.assert_array_equal(out["image_hw"], [SIDE, SIDE])
  x1, x2 = 9.1 * SIDE / 91, 27.3 * SIDE / 91
  np.testing.assert_allclose(out["boxes"][0], [SIDE - x2, 3.7 * SIDE / 37, SIDE - x1,
                                               33.3 * SIDE / 37], rtol=1e-5)
  assert out["image"][:SIDE, SIDE - 5:SIDE].min() == 255 and out["image"][:SIDE, :5].max() == 0
