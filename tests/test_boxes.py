"""boxes.py against torchvision.ops and hand-computed values, all under jax.jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as tv_det_utils

from retinanet_jax import boxes as box_lib


def random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(1, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_pairwise_iou_matches_torchvision():
  rng = np.random.default_rng(0)
  a, b = random_boxes(rng, 37), random_boxes(rng, 23)
  ours = jax.jit(box_lib.pairwise_iou)(a, b)
  ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_pairwise_iou_batched_equals_per_image():
  rng = np.random.default_rng(1)
  a = np.stack([random_boxes(rng, 5) for _ in range(3)])
  b = np.stack([random_boxes(rng, 4) for _ in range(3)])
  ours = jax.jit(box_lib.pairwise_iou)(a, b)
  assert ours.shape == (3, 5, 4)
  for i in range(3):
    np.testing.assert_allclose(ours[i], box_lib.pairwise_iou(a[i], b[i]), rtol=1e-6)


def test_pairwise_iou_golden():
  # Written out by hand: unit squares and a 2x2 square.
  a = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 6, 6]], np.float32)
  b = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [1, 0, 3, 2], [5, 5, 5, 5]], np.float32)
  expected = np.array([
      [1.0, 0.25, 2 / 6, 0.0],   # [0,0,2,2] vs [1,0,3,2]: inter 2, union 6
      [1 / 7, 0.0, 2 / 6, 0.0],  # vs [0,0,2,2]: inter 1, union 7; vs [1,0,3,2]: inter 2, union 6
      [0.0, 0.0, 0.0, 0.0],      # zero-area box: IoU 0, not NaN
  ], np.float32)
  np.testing.assert_allclose(jax.jit(box_lib.pairwise_iou)(a, b), expected, rtol=1e-6)


def test_zero_area_pairs_are_zero_not_nan():
  z = np.array([[3, 3, 3, 3]], np.float32)
  out = jax.jit(box_lib.pairwise_iou)(z, z)
  assert np.all(np.isfinite(out)) and float(out[0, 0]) == 0.0


def test_pairwise_giou_matches_torchvision():
  rng = np.random.default_rng(2)
  a, b = random_boxes(rng, 19), random_boxes(rng, 11)
  ours = jax.jit(box_lib.pairwise_giou)(a, b)
  ref = torchvision.ops.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_elementwise_giou_matches_torchvision_loss():
  rng = np.random.default_rng(3)
  a, b = random_boxes(rng, 50), random_boxes(rng, 50)
  ours = 1 - jax.jit(box_lib.elementwise_giou)(a, b)
  ref = torchvision.ops.generalized_box_iou_loss(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_area_and_clip():
  b = np.array([[-5, -5, 10, 20], [90, 40, 130, 70]], np.float32)
  np.testing.assert_allclose(jax.jit(box_lib.box_area)(b), [375.0, 1200.0])
  clipped = jax.jit(box_lib.clip_boxes, static_argnums=1)(b, (50, 100))
  np.testing.assert_allclose(clipped, [[0, 0, 10, 20], [90, 40, 100, 50]])
  ref = torchvision.ops.clip_boxes_to_image(torch.from_numpy(b), (50, 100)).numpy()
  np.testing.assert_allclose(clipped, ref)
  # Per-image sizes [B, 2].
  per_image = jax.jit(box_lib.clip_boxes)(np.stack([b, b]), np.array([[50, 100], [30, 120]]))
  np.testing.assert_allclose(per_image[1], [[0, 0, 10, 20], [90, 30, 120, 30]])


def test_format_round_trips_and_golden():
  b = np.array([[10, 20, 40, 60]], np.float32)
  np.testing.assert_allclose(box_lib.xyxy_to_xywh(b), [[10, 20, 30, 40]])
  np.testing.assert_allclose(box_lib.xyxy_to_cxcywh(b), [[25, 40, 30, 40]])
  norm = jax.jit(box_lib.xyxy_to_yxyx_normalized, static_argnums=1)(b, (100, 200))
  np.testing.assert_allclose(norm, [[0.2, 0.05, 0.6, 0.2]], rtol=1e-6)
  rng = np.random.default_rng(4)
  r = random_boxes(rng, 20)
  np.testing.assert_allclose(jax.jit(lambda x: box_lib.xywh_to_xyxy(box_lib.xyxy_to_xywh(x)))(r), r,
                             rtol=1e-5)
  np.testing.assert_allclose(
      jax.jit(lambda x: box_lib.cxcywh_to_xyxy(box_lib.xyxy_to_cxcywh(x)))(r), r, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
      box_lib.yxyx_normalized_to_xyxy(box_lib.xyxy_to_yxyx_normalized(r, (300, 150)), (300, 150)), r,
      rtol=1e-5, atol=1e-4)


def test_box_coder_matches_torchvision_and_round_trips():
  rng = np.random.default_rng(5)
  anchors, gt = random_boxes(rng, 64), random_boxes(rng, 64)
  weights = (1.0, 1.0, 1.0, 1.0)
  tv = tv_det_utils.BoxCoder(weights=weights)
  coder = box_lib.BoxCoder(weights=weights)
  ours = jax.jit(coder.encode)(gt, anchors)
  ref = tv.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  deltas = rng.normal(0, 1, (64, 4)).astype(np.float32)
  deltas[0, 2:] = 50.0  # beyond the clamp
  dec = jax.jit(coder.decode)(deltas, anchors)
  ref_dec = tv.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
  np.testing.assert_allclose(dec, ref_dec, rtol=1e-5, atol=1e-3)
  assert np.all(np.isfinite(dec))
  np.testing.assert_allclose(jax.jit(lambda g, a: coder.decode(coder.encode(g, a), a))(gt, anchors),
                             gt, rtol=1e-5, atol=1e-3)


def test_box_coder_weights_and_clamp():
  coder = box_lib.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
  anchors = np.array([[0, 0, 10, 10]], np.float32)
  gt = np.array([[5, 5, 25, 25]], np.float32)
  # Hand computed: centres (5,5)->(15,15), sizes 10->20: dx = 10 * 10/10, dw = 5 * log 2.
  np.testing.assert_allclose(jax.jit(coder.encode)(gt, anchors),
                             [[10.0, 10.0, 5 * math.log(2), 5 * math.log(2)]], rtol=1e-6)
  big = jax.jit(box_lib.BoxCoder().decode)(np.array([[0, 0, 1e4, 1e4]], np.float32), anchors)
  np.testing.assert_allclose(big[0, 2] - big[0, 0], 10 * 1000 / 16, rtol=1e-5)
  with pytest.raises(ValueError, match="weights"):
    box_lib.BoxCoder(weights=(1.0, 0.0, 1.0, 1.0))


def test_bad_shapes_name_the_argument():
  with pytest.raises(ValueError, match=r"boxes1 must have shape \[..., 4\], got \(3, 5\)"):
    box_lib.pairwise_iou(jnp.zeros((3, 5)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="image_hw"):
    box_lib.clip_boxes(jnp.zeros((2, 4)), (1, 2, 3))
