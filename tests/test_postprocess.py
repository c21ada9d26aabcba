"""postprocess.py against torchvision's RetinaNet.postprocess_detections (called by
benchmarks.core.torchvision_postprocess) and batched_nms, under jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from benchmarks.core import torchvision_postprocess
from retinanet_jax import anchors as anchor_lib
from retinanet_jax import postprocess


def random_heads(seed, batch, num_anchors, num_classes):
  rng = np.random.default_rng(seed)
  logits = rng.normal(-5, 1.5, (batch, num_anchors, num_classes)).astype(np.float32)
  deltas = rng.normal(0, 0.5, (batch, num_anchors, 4)).astype(np.float32)
  return logits, deltas


@pytest.mark.parametrize("seed,image,num_classes", [(0, (256, 320), 10), (1, (200, 264), 3)])
def test_matches_torchvision_postprocess(seed, image, num_classes):
  anchor_set = anchor_lib.generate_anchors(image)
  logits, deltas = random_heads(seed, 2, anchor_set.num_anchors, num_classes)
  image_hw = np.array([[image[0], image[1]], [image[0] - 40, image[1] - 17]], np.int32)
  fn = jax.jit(functools.partial(postprocess.postprocess_detections, anchors=anchor_set))
  ours = fn(logits, deltas, image_hw=image_hw)
  ref = torchvision_postprocess(logits, deltas, anchor_set, image_hw)
  for i, det in enumerate(ref):
    n = det["boxes"].shape[0]
    assert n > 10, "the test must exercise NMS with real detections"
    assert int(ours.valid[i].sum()) == n
    np.testing.assert_array_equal(ours.classes[i, :n], det["labels"].numpy())
    np.testing.assert_allclose(ours.boxes[i, :n], det["boxes"].numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(ours.scores[i, :n], det["scores"].numpy(), rtol=1e-6)
    assert not np.any(ours.valid[i, n:]) and np.all(ours.classes[i, n:] == -1)
    assert np.all(np.diff(ours.scores[i, :n]) <= 0)


def test_matches_torchvision_with_other_settings():
  anchor_set = anchor_lib.generate_anchors((128, 128))
  logits, deltas = random_heads(2, 1, anchor_set.num_anchors, 4)
  hw = np.array([[128, 128]], np.int32)
  ours = jax.jit(functools.partial(postprocess.postprocess_detections, anchors=anchor_set,
                                   score_threshold=0.2, topk_candidates=50, nms_threshold=0.3,
                                   max_detections=20))(logits, deltas, image_hw=hw)
  ref = torchvision_postprocess(logits, deltas, anchor_set, hw, score_thresh=0.2, topk_candidates=50,
                                nms_thresh=0.3, detections_per_img=20)[0]
  n = ref["boxes"].shape[0]
  assert n == int(ours.valid[0].sum()) == 20
  np.testing.assert_array_equal(ours.classes[0, :n], ref["labels"].numpy())
  np.testing.assert_allclose(ours.boxes[0, :n], ref["boxes"].numpy(), atol=1e-3)


def test_top_k_pairs_concentrated_in_few_anchors_match_torchvision():
  # The two-stage candidate search (best anchors by their maximum logit, then the best pairs of those
  # anchors) where it matters: a few anchors per level hold many of the level's best pairs, other
  # anchors have one high class each, and many pairs sit just around the score threshold.
  anchor_set = anchor_lib.generate_anchors((128, 160))
  rng = np.random.default_rng(7)
  num_classes = 6
  logits = rng.normal(-4, 1.0, (2, anchor_set.num_anchors, num_classes)).astype(np.float32)
  for start, stop in zip(anchor_set.level_offsets[:-1], anchor_set.level_offsets[1:]):
    hot = rng.choice(np.arange(start, stop), size=min(3, stop - start), replace=False)
    logits[:, hot, :] = rng.uniform(1.0, 4.0, (2, hot.size, num_classes))
    single = rng.choice(np.arange(start, stop), size=min(5, stop - start), replace=False)
    logits[:, single, rng.integers(0, num_classes)] = rng.uniform(0.5, 3.0, (2, single.size))
  threshold_logit = np.log(0.05 / 0.95)
  logits[:, ::7, 1] = threshold_logit + rng.uniform(-1e-3, 1e-3, logits[:, ::7, 1].shape)
  deltas = rng.normal(0, 0.3, (2, anchor_set.num_anchors, 4)).astype(np.float32)
  hw = np.array([[128, 160], [100, 150]], np.int32)
  for topk in (4, 20):
    ours = jax.jit(functools.partial(postprocess.postprocess_detections, anchors=anchor_set,
                                     topk_candidates=topk, nms_threshold=0.7))(
        logits, deltas, image_hw=hw)
    ref = torchvision_postprocess(logits, deltas, anchor_set, hw, topk_candidates=topk,
                                  nms_thresh=0.7)
    for i, det in enumerate(ref):
      n = det["boxes"].shape[0]
      assert n >= 10 and int(ours.valid[i].sum()) == n
      np.testing.assert_array_equal(ours.classes[i, :n], det["labels"].numpy())
      np.testing.assert_allclose(ours.scores[i, :n], det["scores"].numpy(), rtol=1e-6)
      np.testing.assert_allclose(ours.boxes[i, :n], det["boxes"].numpy(), atol=1e-3, rtol=0)


def test_class_wise_nms_matches_batched_nms():
  rng = np.random.default_rng(3)
  xy = rng.uniform(0, 100, (300, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2))], 1).astype(np.float32)
  scores = rng.uniform(size=300).astype(np.float32)
  classes = rng.integers(0, 3, 300).astype(np.int32)
  index, valid = jax.jit(functools.partial(postprocess.class_wise_nms, iou_threshold=0.5,
                                           max_detections=300))(boxes, scores, classes)
  ref = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                    torch.from_numpy(classes), 0.5).numpy()
  assert int(valid.sum()) == ref.shape[0]
  np.testing.assert_array_equal(np.asarray(index)[np.asarray(valid)], ref)


def test_golden_nms():
  # Two same-class boxes with IoU 0.81 (one survives), one of another class on top (kept),
  # a candidate below the score threshold (never kept).
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, -np.inf], np.float32)
  classes = np.array([1, 1, 2, 1], np.int32)
  index, valid = jax.jit(functools.partial(postprocess.class_wise_nms, iou_threshold=0.5,
                                           max_detections=4))(boxes, scores, classes)
  np.testing.assert_array_equal(valid, [True, True, False, False])
  np.testing.assert_array_equal(np.asarray(index)[:2], [0, 2])


def test_no_detections_above_threshold():
  anchor_set = anchor_lib.generate_anchors((64, 64))
  logits = np.full((1, anchor_set.num_anchors, 2), -20.0, np.float32)
  deltas = np.zeros((1, anchor_set.num_anchors, 4), np.float32)
  det = jax.jit(functools.partial(postprocess.postprocess_detections, anchors=anchor_set))(
      logits, deltas, image_hw=np.array([[64, 64]]))
  assert not np.any(det.valid) and np.all(det.scores == 0) and np.all(np.isfinite(det.boxes))


def test_bad_input_raises():
  anchor_set = anchor_lib.generate_anchors((64, 64))
  logits = jnp.zeros((1, anchor_set.num_anchors + 1, 2))
  with pytest.raises(ValueError, match="anchors"):
    postprocess.postprocess_detections(logits, jnp.zeros((1, anchor_set.num_anchors + 1, 4)),
                                       anchors=anchor_set, image_hw=jnp.array([[64, 64]]))
  logits = jnp.zeros((1, anchor_set.num_anchors, 2))
  with pytest.raises(ValueError, match=r"image_hw must be \[B, 2\]"):
    postprocess.postprocess_detections(logits, jnp.zeros((1, anchor_set.num_anchors, 4)),
                                       anchors=anchor_set, image_hw=jnp.array([64, 64]))


def test_detection_candidates_then_nms_is_postprocess_detections():
  """The candidates the ONNX export hands to ONNX's NMS (`detection_candidates`), put through
  `class_wise_nms`, give `postprocess_detections`' detections; non-candidates are -inf."""
  anchor_set = anchor_lib.generate_anchors((200, 264))
  logits, deltas = random_heads(4, 2, anchor_set.num_anchors, 5)
  image_hw = np.array([[200, 264], [150, 230]], np.int32)
  boxes, scores, classes = jax.jit(functools.partial(postprocess.detection_candidates,
                                                     anchors=anchor_set))(logits, deltas,
                                                                          image_hw=image_hw)
  assert boxes.shape[:2] == scores.shape == classes.shape and classes.dtype == jnp.int32
  assert 0 < int(jnp.isfinite(scores).sum()) < scores.size and bool(jnp.all(
      jnp.where(jnp.isfinite(scores), scores > 0.05, scores == -jnp.inf)))
  reference = jax.jit(functools.partial(postprocess.postprocess_detections, anchors=anchor_set))(
      logits, deltas, image_hw=image_hw)
  for i in range(2):
    index, valid = jax.jit(functools.partial(postprocess.class_wise_nms, iou_threshold=0.5,
                                             max_detections=100))(boxes[i], scores[i], classes[i])
    np.testing.assert_array_equal(valid, reference.valid[i])
    np.testing.assert_array_equal(np.asarray(boxes[i])[np.asarray(index)][np.asarray(valid)],
                                  np.asarray(reference.boxes[i])[np.asarray(valid)])
    np.testing.assert_array_equal(np.asarray(classes[i])[np.asarray(index)][np.asarray(valid)],
                                  np.asarray(reference.classes[i])[np.asarray(valid)])


# --- Tiled NMS: the rounds NMS (the reference) and torchvision's batched_nms, on adversarial sets. ---

@functools.lru_cache(maxsize=None)
def _jit_nms(fn, max_detections, tile=None):  # one compilation per form, D and tile
  kwargs = {} if tile is None else {"tile": tile}
  return jax.jit(functools.partial(fn, iou_threshold=0.5, max_detections=max_detections, **kwargs))


def _nms(fn, boxes, scores, classes, *, max_detections, tile=None):
  index, valid = _jit_nms(fn, max_detections, tile)(boxes, scores, classes)
  return np.asarray(index)[np.asarray(valid)]


def _adversarial_sets():
  rng = np.random.default_rng(21)
  n = 300
  xy = rng.uniform(0, 200, (n, 2))
  random_boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (n, 2))], 1).astype(np.float32)
  random_scores = rng.uniform(size=n).astype(np.float32)
  random_scores[rng.uniform(size=n) < 0.2] = -np.inf  # non-candidates scattered among candidates
  classes = rng.integers(0, 3, n).astype(np.int32)
  yield "random", random_boxes, random_scores, classes
  # Identical boxes: one survivor per class.
  yield ("identical boxes", np.tile(np.float32([[10, 10, 50, 50]]), (n, 1)), random_scores,
         classes)
  # Identical scores (ties broken by index), on a grid of integer boxes with many overlaps.
  grid = np.round(random_boxes / 8) * 8
  yield "identical scores", grid, np.full(n, 0.5, np.float32), classes
  # IoU exactly at the threshold: 6 px wide boxes 2 px apart overlap neighbours with IoU exactly
  # 0.5 (4 / 8, exact in float32); they are NOT suppressed ('>').
  x = np.arange(n, dtype=np.float32) * 2
  at = np.stack([x, np.zeros(n, np.float32), x + 6, np.full(n, 10, np.float32)], 1)
  yield "IoU at the threshold", at, np.linspace(1, 0, n, dtype=np.float32), np.zeros(n, np.int32)


@pytest.mark.parametrize("max_detections", [7, 300])
def test_tiled_nms_equals_rounds_nms_and_batched_nms(max_detections):
  for name, boxes, scores, classes in _adversarial_sets():
    reference = _nms(postprocess.class_wise_nms, boxes, scores, classes,
                     max_detections=max_detections)
    for tile in (64, postprocess.TILE):
      tiled = _nms(postprocess.tiled_class_wise_nms, boxes, scores, classes,
                   max_detections=max_detections, tile=tile)
      np.testing.assert_array_equal(tiled, reference, err_msg=f"{name}, tile {tile}")
    ok = np.isfinite(scores)
    tv = torchvision.ops.batched_nms(torch.from_numpy(boxes[ok]), torch.from_numpy(scores[ok]),
                                     torch.from_numpy(classes[ok]), 0.5).numpy()[:max_detections]
    tv = np.nonzero(ok)[0][tv]
    # torchvision's sort is not stable: among exactly tied scores it may keep another of the tied
    # boxes; the kept boxes, classes and scores agree.
    assert tiled.shape == tv.shape, name
    for array in (boxes, scores, classes):
      np.testing.assert_array_equal(np.sort(array[tiled], axis=0), np.sort(array[tv], axis=0),
                                    err_msg=name)
    if name == "random":
      np.testing.assert_array_equal(tiled, tv)


def test_golden_tiled_nms_at_the_threshold():
  # IoU exactly 0.5 (B0, B1: 100 / 200) keeps both boxes; B2 has IoU 0.9 with B0: suppressed; B3
  # (lower score than B4, IoU 0.9 with it) is suppressed by B4 across a tile boundary.
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 9], [50, 50, 60, 59],
                    [50, 50, 60, 60]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.5, 0.6], np.float32)
  for tile in (1, 2, 5):
    kept = _nms(postprocess.tiled_class_wise_nms, boxes, scores, np.zeros(5, np.int32),
                max_detections=5, tile=tile)
    np.testing.assert_array_equal(kept, [0, 1, 4])


def test_postprocess_nms_modes_agree():
  anchor_set = anchor_lib.generate_anchors((128, 128))
  rng = np.random.default_rng(22)
  logits = rng.normal(-3, 2, (2, anchor_set.num_anchors, 3)).astype(np.float32)
  deltas = rng.normal(0, 0.2, (2, anchor_set.num_anchors, 4)).astype(np.float32)
  hw = np.array([[128, 128], [100, 120]])
  out = {mode: jax.jit(lambda c, d, h, mode=mode: postprocess.postprocess_detections(
      c, d, anchors=anchor_set, image_hw=h, max_detections=300, nms_mode=mode))(logits, deltas, hw)
         for mode in postprocess.NMS_MODES}
  assert int(out["tiled"].valid.sum()) > 300  # many detections: the rounds run out of D
  for field in ("boxes", "scores", "classes", "valid"):
    np.testing.assert_array_equal(getattr(out["tiled"], field), getattr(out["rounds"], field))
  with pytest.raises(ValueError, match="nms_mode"):
    postprocess.postprocess_detections(logits, deltas, anchors=anchor_set, image_hw=hw,
                                       nms_mode="fast")
