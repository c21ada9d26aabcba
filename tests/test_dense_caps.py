"""Caps in the thousands (issue 12): 2,000+ ground-truth slots, 5,000 candidates per level and 1,000
detections run end to end and equal their references; boxes past the cap are counted, never an error."""

import functools

import jax
import numpy as np
import tensorflow as tf

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import config as config_lib
from retinanet_jax import labeling, postprocess
from retinanet_jax.data import config as data_config_lib
from retinanet_jax.data import transforms


def test_transform_keeps_2000_boxes_and_counts_the_rest():
  c = data_config_lib.default_data_config()
  c.update(eval_min_size=256, max_size=256, pad_multiple=32, max_boxes=2000)
  config = transforms.TransformConfig.from_data_config(c)
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 240, (2500, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(2, 16, (2500, 2))], 1).astype(np.float32)
  example = {"image": tf.zeros([256, 256, 3], tf.uint8), "boxes": tf.constant(boxes),
             "labels": tf.range(2500), "is_crowd": tf.zeros([2500], tf.bool),
             "image_id": tf.constant(1, tf.int64), "original_hw": tf.constant([256, 256])}
  out = transforms.preprocess(example, config=config, train=False,
                              seed=tf.constant([0, 1], tf.int64))
  assert int(out["num_truncated_boxes"]) == 500 and int(out["num_dropped_boxes"]) == 0
  assert out["boxes"].shape == (2000, 4) and bool(tf.reduce_all(out["box_mask"]))
  np.testing.assert_allclose(out["boxes"].numpy(), np.minimum(boxes[:2000], 256), atol=1e-4)


def test_config_accepts_caps_in_the_thousands():
  c = config_lib.default_config()
  c.data.max_boxes = 3000
  c.eval.max_detections = 1000
  c.eval.topk_candidates = 5000
  c.eval.max_dets = (1, 10, 100, 1000)
  config = config_lib.Config.from_config_dict(c)
  assert (config.data.max_boxes, config.eval.max_detections, config.eval.topk_candidates) == (
      3000, 1000, 5000)


def test_labeling_and_postprocessing_at_thousands():
  anchor_set = anchor_lib.generate_anchors((192, 192))  # P3: 5,184 anchors, more than 5,000
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, 176, (1, 2000, 2))
  gt = np.concatenate([xy, xy + rng.uniform(8, 40, (1, 2000, 2))], -1).astype(np.float32)
  mask = np.ones((1, 2000), bool)
  targets = jax.jit(functools.partial(labeling.label_anchors, block_size=128))(
      anchor_set.boxes, gt, np.zeros((1, 2000), np.int32), mask)
  dense = jax.jit(labeling.label_anchors)(anchor_set.boxes, gt, np.zeros((1, 2000), np.int32), mask)
  np.testing.assert_array_equal(targets.labels, dense.labels)
  assert int(targets.num_positives) > 2000
  logits = rng.normal(-1, 2, (1, anchor_set.num_anchors, 2)).astype(np.float32)
  deltas = rng.normal(0, 0.2, (1, anchor_set.num_anchors, 4)).astype(np.float32)
  hw = np.array([[192, 192]])
  run = lambda mode: jax.jit(lambda c, d, h: postprocess.postprocess_detections(
      c, d, anchors=anchor_set, image_hw=h, topk_candidates=5000, max_detections=1000,
      nms_mode=mode))(logits, deltas, hw)
  tiled, rounds = run("tiled"), run("rounds")
  assert int(tiled.valid.sum()) == 1000  # enough candidates survive NMS to fill D
  for field in ("boxes", "scores", "classes", "valid"):
    np.testing.assert_array_equal(getattr(tiled, field), getattr(rounds, field))
