"""Detections from head outputs, on device, with static shapes: decode, top-k, class-wise NMS.

Shapes: `B` images, `A` anchors per image, `K` classes, `D = max_detections` detections per image.

For each image and each pyramid level (torchvision's `RetinaNet.postprocess_detections`): class
probabilities `sigmoid(logits)`; the (anchor, class) pairs with probability > `score_threshold`; of those
the `topk_candidates` best; their boxes decoded against their anchors and clipped to the image. All
levels' candidates then go through class-wise NMS (a box is suppressed by a higher-scoring kept box of
the same class with IoU > `nms_threshold`), and the best `max_detections` survivors are returned in
descending score order.

NMS is greedy and exact, identical picks to torchvision's `batched_nms` followed by `[:D]` (up to the
order of exactly tied scores), in one of two forms (`nms_mode`):
  * `rounds` (`class_wise_nms`): `max_detections` rounds of "take the best remaining candidate,
    suppress its same-class neighbours": O(D x N) work with N candidates, no N x N matrix, but D
    sequential steps, each touching all N candidates;
  * `tiled` (`tiled_class_wise_nms`, the default): the candidates sorted by score, then visited in
    tiles of `TILE` (TF Model Garden's tiled NMS, torchvision's CUDA kernel): a tile is first
    suppressed by the boxes kept so far (at most D: one `[TILE, D]` IoU block), then greedily within
    itself (a `[TILE, TILE]` suppression mask resolved by a fixed-point iteration that converges to
    the greedy order's result); the loop stops once D boxes are kept or the candidates run out.
    O(N' x D) work for the N' <= N candidates visited, in N' / TILE sequential steps.
Both pick the same boxes in the same order (tests/test_postprocess.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import boxes as box_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Detections:
  """Detections of a batch; rows where `valid` is False are padding (zero box, score 0, class -1).

  Attributes:
    boxes: float32 `[B, D, 4]`, `[x1, y1, x2, y2]` pixels of the network input (clipped to image_hw).
    scores: float32 `[B, D]`, descending within each image.
    classes: int32 `[B, D]`, contiguous class index in `0..K-1`.
    valid: bool `[B, D]`.
  """

  boxes: jax.Array
  scores: jax.Array
  classes: jax.Array
  valid: jax.Array


def _candidates_one_image(cls_logits, box_deltas, anchors, image_hw, *, level_offsets,
                          score_threshold, topk_candidates, box_coder):
  """Per level: threshold, top-k, decode, clip. Returns boxes [N, 4], scores [N], classes [N].

  Picks what torchvision's "scores above the threshold, then their top k" picks, in two cheap stages
  instead of a top-k over all A x K (anchor, class) scores:
  1. sigmoid is increasing, so ranking logits ranks scores, and the candidates above the threshold
     are a prefix of the top k: the top k runs on logits, the sigmoid and the threshold on the k picked;
  2. every one of the level's k best pairs belongs to one of the k anchors with the best maximum
     logit (an anchor outside those has a maximum below k pairs of other anchors), so the top k of
     the anchors' maxima (`[A_level]`) comes first and the pairs' top k runs on those anchors' `k x K`
     logits only.
  Identical picks, up to the order of exactly tied logits."""
  num_classes = cls_logits.shape[-1]
  anchor_max = jnp.max(cls_logits, axis=-1)  # [A]: one pass over the logits for all levels
  all_boxes, all_scores, all_classes = [], [], []
  for start, stop in zip(level_offsets[:-1], level_offsets[1:]):
    k_anchors = min(topk_candidates, stop - start)
    _, best_anchors = jax.lax.top_k(anchor_max[start:stop], k_anchors)
    logits = cls_logits[start:stop][best_anchors].reshape(-1)  # [k_anchors * K]
    k = min(topk_candidates, logits.shape[0])
    top_logits, top_index = jax.lax.top_k(logits, k)
    scores = jax.nn.sigmoid(top_logits.astype(jnp.float32))
    top_scores = jnp.where(scores > score_threshold, scores, -jnp.inf)
    anchor_index = best_anchors[top_index // num_classes]
    classes = top_index % num_classes
    decoded = box_coder.decode(box_deltas[start:stop][anchor_index], anchors[start:stop][anchor_index])
    all_boxes.append(box_lib.clip_boxes(decoded, image_hw))
    all_scores.append(top_scores)
    all_classes.append(classes.astype(jnp.int32))
  return (jnp.concatenate(all_boxes), jnp.concatenate(all_scores), jnp.concatenate(all_classes))


def detection_candidates(cls_logits, box_deltas, *, anchors: anchor_lib.AnchorSet, image_hw,
                         score_threshold: float = 0.05, topk_candidates: int = 1000,
                         box_coder: box_lib.BoxCoder = box_lib.BoxCoder()):
  """The candidates that `postprocess_detections` passes to NMS, for a post-processing done elsewhere
  (the ONNX export runs ONNX's NonMaxSuppression on them).

  Args: as `postprocess_detections`.

  Returns:
    `(boxes [B, N, 4] float32, scores [B, N] float32, classes [B, N] int32)`, `N` the sum over levels
    of `min(topk_candidates, level anchors x K)`; boxes `[x1, y1, x2, y2]` decoded and clipped to
    `image_hw`; `scores` is `-inf` where a pair did not pass `score_threshold` (not a candidate).
  """
  anchor_boxes = jnp.asarray(anchors.boxes)

  def one_image(logits, deltas, hw):
    return _candidates_one_image(
        logits, deltas, anchor_boxes, hw.astype(jnp.float32), level_offsets=anchors.level_offsets,
        score_threshold=score_threshold, topk_candidates=topk_candidates, box_coder=box_coder)

  return jax.vmap(one_image)(cls_logits, box_deltas, jnp.asarray(image_hw))


def class_wise_nms(boxes, scores, classes, *, iou_threshold: float, max_detections: int):
  """Greedy class-wise NMS of one image's candidates, static shapes.

  Args:
    boxes: float32 `[N, 4]` `xyxy`; scores: float32 `[N]` (`-inf` marks a non-candidate);
    classes: int32 `[N]`.
    iou_threshold: a candidate is suppressed by a kept box of its class with IoU > this.
    max_detections: `D`, the number of rounds (kept boxes) at most.

  Returns:
    `(index [D] int32, valid [D] bool)`: the kept candidates' indices in descending score order.
  """
  num = scores.shape[0]
  positions = jnp.arange(num)

  def body(i, carry):
    remaining, index, valid = carry
    best = jnp.argmax(remaining)
    ok = remaining[best] > -jnp.inf
    iou = box_lib.pairwise_iou(boxes[best][None], boxes)[0]
    suppress = ((iou > iou_threshold) & (classes == classes[best])) | (positions == best)
    remaining = jnp.where(ok & suppress, -jnp.inf, remaining)
    return remaining, index.at[i].set(best.astype(jnp.int32)), valid.at[i].set(ok)

  init = (scores, jnp.zeros((max_detections,), jnp.int32), jnp.zeros((max_detections,), bool))
  _, index, valid = jax.lax.fori_loop(0, max_detections, body, init)
  return index, valid


NMS_MODES = ("tiled", "rounds")
TILE = 256  # candidates per tile of tiled_class_wise_nms


def tiled_class_wise_nms(boxes, scores, classes, *, iou_threshold: float, max_detections: int,
                         tile: int = TILE):
  """Greedy class-wise NMS of one image's candidates in tiles of sorted candidates (module
  docstring); the same result as `class_wise_nms`.

  Args:
    boxes: float32 `[N, 4]` `xyxy`; scores: float32 `[N]` (`-inf` marks a non-candidate);
    classes: int32 `[N]`.
    iou_threshold: a candidate is suppressed by a kept box of its class with IoU > this.
    max_detections: `D`, kept boxes at most.
    tile: candidates per tile (any value gives the same result; `TILE` by default).

  Returns:
    `(index [D] int32, valid [D] bool)`: the kept candidates' indices in descending score order
    (ties: lower index first).
  """
  num = scores.shape[0]
  tile = max(1, min(int(tile), num))
  num_tiles = -(-num // tile)
  padded = num_tiles * tile
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)  # descending; ties: lower index first
  pad = padded - num
  sorted_scores = jnp.concatenate([scores[order], jnp.full((pad,), -jnp.inf, scores.dtype)])
  sorted_boxes = jnp.concatenate([boxes[order].astype(jnp.float32), jnp.zeros((pad, 4))])
  sorted_classes = jnp.concatenate([classes[order].astype(jnp.int32), jnp.full((pad,), -1, jnp.int32)])
  sorted_index = jnp.concatenate([order, jnp.zeros((pad,), jnp.int32)])
  earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # [j, i]: j before i

  def suppresses(boxes_a, classes_a, boxes_b, classes_b):  # [Na, Nb]: a suppresses b
    iou = box_lib.pairwise_iou(boxes_a, boxes_b)
    return (iou > iou_threshold) & (classes_a[:, None] == classes_b[None, :])

  def cond(carry):
    t, count, _, _, _ = carry
    first_score = jax.lax.dynamic_index_in_dim(sorted_scores, t * tile, keepdims=False)
    return (t < num_tiles) & (count < max_detections) & (first_score > -jnp.inf)

  def body(carry):
    t, count, kept_boxes, kept_classes, kept_index = carry
    start = t * tile
    tb = jax.lax.dynamic_slice_in_dim(sorted_boxes, start, tile)
    tc = jax.lax.dynamic_slice_in_dim(sorted_classes, start, tile)
    ts = jax.lax.dynamic_slice_in_dim(sorted_scores, start, tile)
    ti = jax.lax.dynamic_slice_in_dim(sorted_index, start, tile)
    kept_valid = jnp.arange(max_detections) < count
    by_kept = jnp.any(suppresses(kept_boxes, kept_classes, tb, tc) & kept_valid[:, None], axis=0)
    alive = (ts > -jnp.inf) & ~by_kept
    within = suppresses(tb, tc, tb, tc) & earlier  # [j, i]: earlier j suppresses i

    def refine(state):  # keep[i] = alive[i] and no kept earlier j of the tile suppresses i
      keep, _ = state
      new = alive & ~jnp.any(within & keep[:, None], axis=0)
      return new, jnp.any(new != keep)

    keep, _ = jax.lax.while_loop(lambda s: s[1], refine, (alive, jnp.bool_(True)))
    slot = count + jnp.cumsum(keep) - 1
    target = jnp.where(keep, slot, max_detections)  # beyond D: dropped
    kept_boxes = kept_boxes.at[target].set(tb, mode="drop")
    kept_classes = kept_classes.at[target].set(tc, mode="drop")
    kept_index = kept_index.at[target].set(ti, mode="drop")
    return t + 1, count + jnp.sum(keep), kept_boxes, kept_classes, kept_index

  init = (jnp.int32(0), jnp.int32(0), jnp.zeros((max_detections, 4), jnp.float32),
          jnp.full((max_detections,), -1, jnp.int32), jnp.zeros((max_detections,), jnp.int32))
  _, count, _, _, index = jax.lax.while_loop(cond, body, init)
  return index, jnp.arange(max_detections) < count


def postprocess_detections(cls_logits, box_deltas, *, anchors: anchor_lib.AnchorSet, image_hw,
                           score_threshold: float = 0.05, topk_candidates: int = 1000,
                           nms_threshold: float = 0.5, max_detections: int = 100,
                           nms_mode: str = "tiled",
                           box_coder: box_lib.BoxCoder = box_lib.BoxCoder()) -> Detections:
  """Detections `[B, D, ...]` from head outputs `cls_logits [B, A, K]` and `box_deltas [B, A, 4]`.

  Args:
    cls_logits: float `[B, A, K]` in the order of `anchors` (any float dtype; scored in float32).
    box_deltas: float `[B, A, 4]` BoxCoder deltas.
    anchors: the `AnchorSet` of the padded input size.
    image_hw: int or float `[B, 2]`, each image's valid (unpadded) height and width; boxes are
      clipped to it.
    score_threshold, topk_candidates, nms_threshold, max_detections: torchvision's
      0.05 / 1000 / 0.5 / 100 by default (the paper's 0.05 / 1000 / 0.5 / 100 too).
    nms_mode: 'tiled' (`tiled_class_wise_nms`) or 'rounds' (`class_wise_nms`): the same
      detections; tiled scales with D (module docstring).

  Returns:
    `Detections` with `D = max_detections` rows per image, in input pixels. Map them to original
    pixels by dividing by the resize scale.
  """
  if cls_logits.ndim != 3:
    raise ValueError(f"cls_logits must be [B, A, K], got {tuple(cls_logits.shape)}")
  batch, num_anchors, _ = cls_logits.shape
  if num_anchors != anchors.num_anchors:
    raise ValueError(f"cls_logits has {num_anchors} anchors but the AnchorSet for "
                     f"{anchors.image_size} has {anchors.num_anchors}")
  if box_deltas.shape != (batch, num_anchors, 4):
    raise ValueError(f"box_deltas must be [B, A, 4] = {(batch, num_anchors, 4)}, got "
                     f"{tuple(box_deltas.shape)}")
  image_hw = jnp.asarray(image_hw)
  if image_hw.shape != (batch, 2):
    raise ValueError(f"image_hw must be [B, 2] = {(batch, 2)}, got {tuple(image_hw.shape)}")
  if nms_mode not in NMS_MODES:
    raise ValueError(f"nms_mode must be one of {NMS_MODES}, got {nms_mode!r}")
  nms = tiled_class_wise_nms if nms_mode == "tiled" else class_wise_nms
  for name, value in (("topk_candidates", topk_candidates), ("max_detections", max_detections)):
    if int(value) != value or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value}")

  anchor_boxes = jnp.asarray(anchors.boxes)

  def one_image(logits, deltas, hw):
    boxes, scores, classes = _candidates_one_image(
        logits, deltas, anchor_boxes, hw.astype(jnp.float32), level_offsets=anchors.level_offsets,
        score_threshold=score_threshold, topk_candidates=topk_candidates, box_coder=box_coder)
    index, valid = nms(boxes, scores, classes, iou_threshold=nms_threshold,
                       max_detections=max_detections)
    return Detections(boxes=jnp.where(valid[:, None], boxes[index], 0.0),
                      scores=jnp.where(valid, scores[index], 0.0),
                      classes=jnp.where(valid, classes[index], -1), valid=valid)

  return jax.vmap(one_image)(cls_logits, box_deltas, image_hw)
