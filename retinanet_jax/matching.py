"""Anchor-to-ground-truth matching on padded ground truth, for one image; vmap it over a batch.

Shapes: `A` anchors, `M` padded ground-truth slots (a validity mask marks the real ones).

Rule (the paper's, and torchvision's / detectron2's `Matcher` with thresholds (0.4, 0.5)): each anchor
takes the ground-truth box of highest IoU; it is POSITIVE if that IoU >= `positive_threshold`,
NEGATIVE if < `negative_threshold`, IGNORE in between. Low-quality matches, a mode:
  * `ties` (torchvision, detectron2 `allow_low_quality_matches=True`): for each box, every anchor whose
    IoU equals that box's highest IoU over all anchors becomes POSITIVE, matched to the anchor's own
    best box (not necessarily the box that promoted it). Exactly torchvision's behaviour, including
    its quirk that a box overlapping no anchor (highest IoU 0) promotes every anchor with IoU 0 to it.
    Zero-area boxes are dropped by the input pipeline for that reason.
  * `force` (TF Model Garden / TPU RetinaNet): each valid box's best anchor (lowest index on ties) is
    made POSITIVE and matched to that box; later boxes win when two boxes pick the same anchor.
  * `none`: thresholds only.

Crowd boxes (COCO `iscrowd`) never produce positives: matching runs on the non-crowd boxes, then an
anchor whose best IoU with any crowd box exceeds its best IoU with the non-crowd boxes and reaches
`negative_threshold` becomes IGNORE. An image with no valid non-crowd box is all NEGATIVE (minus those
crowd-ignored anchors).

Padded slots (mask False) never match anything. Everything is static-shaped.

Memory and speed: the `[M, A]` IoU matrix is never built whole. A `lax.scan` over blocks of
`block_size` ground-truth slots computes one `[block_size, A]` IoU block per step (IoU as
torchvision's `box_iou`: no +1, the same float32 values (tests/test_matching.py); 0 for an empty
union) and folds it into running values per anchor (best IoU, its slot, best crowd IoU, tie flag)
and per box (best IoU over all anchors, best anchor). Blocks of at most `UNROLLED_BLOCK_SLOTS` slots
fold their rows one at a time in slot order (elementwise float ops, which XLA fuses into one loop
per running value); larger blocks fold through max/argmax reductions over the block (XLA's column
reductions: slower on the CPU). Strict '>' from row to row and block to block, and the first index
within a reduction, keep the lowest slot on ties, as `torch.max`: every block size gives the same
assignments, ties included, and one block of all M slots is the dense form. `block_size=0` (auto)
splits the M slots into `M // AUTO_BLOCK_SLOTS` blocks of equal size (16 to 31 slots; one block when
M < 32), the block size that was fastest on the CPU at 76,725 and 201,600 anchors
(docs/benchmarks.md): its memory is a few `[block, A]` blocks whatever M (at 76,725 anchors and
2,000 boxes, 16-slot blocks of 5 MB rather than a 614 MB matrix per image).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


POSITIVE = 1
NEGATIVE = 0
IGNORE = -1

LOW_QUALITY_MODES = ("ties", "force", "none")
# block_size=0 (auto): M // AUTO_BLOCK_SLOTS blocks of equal size (resolve_block_size).
AUTO_BLOCK_SLOTS = 16
# Blocks of at most this many slots fold their rows one at a time (unrolled); larger blocks reduce.
UNROLLED_BLOCK_SLOTS = 32


def _nan_boxes_to_zero(boxes):
  """`boxes [N, 4]` with every box that has a NaN coordinate replaced by [0, 0, 0, 0], whose IoU
  with any box is 0, in every block form (as an IoU guarded by `where(union > 0, ..., 0)` gives,
  NaN > 0 being False; `iou_with` guards the union only, which would let a NaN through)."""
  return jnp.where(jnp.any(jnp.isnan(boxes), axis=-1, keepdims=True), 0.0, boxes)


def resolve_block_size(block_size: int, *, num_gt: int) -> int:
  """The ground-truth slots per IoU block that `match_anchors` uses (module docstring): `block_size`
  itself (at most `num_gt`), or for 0 (auto) `num_gt // AUTO_BLOCK_SLOTS` blocks (at least one) of
  equal size: `AUTO_BLOCK_SLOTS` to `2 * AUTO_BLOCK_SLOTS - 1` slots, or all `num_gt` when fewer."""
  if int(block_size) != block_size or block_size < 0:
    raise ValueError(f"block_size must be an integer >= 0 (0: auto), got {block_size}")
  num_gt = max(int(num_gt), 1)
  if block_size == 0:
    blocks = max(1, num_gt // AUTO_BLOCK_SLOTS)
    return -(-num_gt // blocks)
  return min(int(block_size), num_gt)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MatchResult:
  """Result of matching (leading batch dims allowed when vmapped).

  Attributes:
    gt_index: int32 `[A]`, the ground-truth slot matched to each anchor. Meaningful only where
      `state == POSITIVE`; elsewhere it is the anchor's best slot (0 when the image has no box).
    state: int32 `[A]`, POSITIVE (1), NEGATIVE (0) or IGNORE (-1).
    max_iou: float32 `[A]`, the anchor's best IoU with a valid non-crowd box (0 if none).
  """

  gt_index: jax.Array
  state: jax.Array
  max_iou: jax.Array

  def to_torchvision(self):
    """torchvision `Matcher` encoding: the gt index for positives, -1 below, -2 between thresholds."""
    return jnp.where(self.state == POSITIVE, self.gt_index,
                     jnp.where(self.state == NEGATIVE, -1, -2))


def match_anchors(anchors, gt_boxes, gt_mask, *, gt_is_crowd=None, positive_threshold: float = 0.5,
                  negative_threshold: float = 0.4, low_quality: str = "ties",
                  block_size: int = 0) -> MatchResult:
  """Matches `anchors [A, 4]` to padded `gt_boxes [M, 4]` (both `xyxy` pixels) of one image.

  Args:
    anchors: float `[A, 4]`.
    gt_boxes: float `[M, 4]`; rows where `gt_mask` is False are ignored whatever they hold.
    gt_mask: bool `[M]`, True for real boxes.
    gt_is_crowd: optional bool `[M]`, True for crowd boxes.
    positive_threshold: IoU at or above which an anchor is POSITIVE (0.5).
    negative_threshold: IoU below which an anchor is NEGATIVE (0.4); must be <= positive_threshold.
    low_quality: 'ties', 'force' or 'none' (module docstring).
    block_size: ground-truth slots per IoU block (module docstring): 0 chooses (blocks of 16 to 31
      slots), M is the dense form; the result does not depend on it, only memory and speed do.

  Returns:
    `MatchResult` with `[A]` arrays. Use `jax.vmap(functools.partial(match_anchors, ...),
    in_axes=(None, 0, 0, 0))` (or `batch_match_anchors`) for `[B, M, ...]` ground truth.
  """
  if low_quality not in LOW_QUALITY_MODES:
    raise ValueError(f"low_quality must be one of {LOW_QUALITY_MODES}, got {low_quality!r}")
  if negative_threshold > positive_threshold:
    raise ValueError(f"negative_threshold ({negative_threshold}) must be <= positive_threshold "
                     f"({positive_threshold})")
  if anchors.ndim != 2 or anchors.shape[-1] != 4:
    raise ValueError(f"anchors must be [A, 4], got {tuple(anchors.shape)}")
  if gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4:
    raise ValueError(f"gt_boxes must be [M, 4], got {tuple(gt_boxes.shape)}")
  num_gt = gt_boxes.shape[0]
  if gt_mask.shape != (num_gt,):
    raise ValueError(f"gt_mask must be [M] = [{num_gt}], got {tuple(gt_mask.shape)}")
  if gt_is_crowd is not None and gt_is_crowd.shape != (num_gt,):
    raise ValueError(f"gt_is_crowd must be [M] = [{num_gt}], got {tuple(gt_is_crowd.shape)}")
  num_anchors = anchors.shape[0]
  if num_gt == 0:
    zeros = jnp.zeros((num_anchors,), jnp.int32)
    return MatchResult(gt_index=zeros, state=zeros + NEGATIVE, max_iou=jnp.zeros((num_anchors,)))

  block = resolve_block_size(block_size, num_gt=num_gt)
  num_blocks = -(-num_gt // block)
  padded = num_blocks * block  # slots past num_gt: invalid padding
  gt_mask = gt_mask.astype(bool)
  crowd = jnp.zeros((num_gt,), bool) if gt_is_crowd is None else gt_is_crowd.astype(bool)
  matchable = gt_mask & ~crowd
  crowd_slots = gt_mask & crowd
  gt_boxes = _nan_boxes_to_zero(gt_boxes.astype(jnp.float32))
  if padded > num_gt:
    extra = padded - num_gt
    gt_boxes = jnp.concatenate([gt_boxes, jnp.zeros((extra, 4), jnp.float32)])
    matchable = jnp.concatenate([matchable, jnp.zeros((extra,), bool)])
    crowd_slots = jnp.concatenate([crowd_slots, jnp.zeros((extra,), bool)])
  anchors = _nan_boxes_to_zero(anchors.astype(jnp.float32))
  ax1, ay1, ax2, ay2 = (anchors[None, :, i] for i in range(4))
  anchor_area = (ax2 - ax1) * (ay2 - ay1)

  def iou_with(boxes):  # [block, A]: IoU of a block of boxes with every anchor, as pairwise_iou
    bx1, by1, bx2, by2 = (boxes[:, None, i] for i in range(4))
    iw = jnp.maximum(jnp.minimum(ax2, bx2) - jnp.maximum(ax1, bx1), 0.0)
    ih = jnp.maximum(jnp.minimum(ay2, by2) - jnp.maximum(ay1, by1), 0.0)
    inter = iw * ih
    union = anchor_area + (bx2 - bx1) * (by2 - by1) - inter
    # 0 where the union is empty: inter is 0 there, so the guard needs no select after the
    # division. XLA then keeps the whole IoU in the fusion of the division; a select after it would
    # be recomputed, with the union, in every fusion that reads the block.
    return inter / jnp.where(union > 0, union, 1.0)

  # Slot masks as float offsets, added to a slot's IoUs: -3 takes an invalid slot's "quality" below
  # the running best's start (-1), so it never wins; +3 takes a box's best IoU above any IoU, so it
  # promotes nothing. x + 0 == x exactly, and XLA vectorizes a float chain where a boolean select
  # per row did not (measured: see docs/benchmarks.md).
  match_offset = jnp.where(matchable, 0.0, -3.0)
  crowd_offset = jnp.where(crowd_slots, 0.0, -3.0)
  tie_offset = jnp.where(matchable, 0.0, 3.0)
  unrolled = block <= UNROLLED_BLOCK_SLOTS

  # A lax.scan over the blocks of slots, each step a vectorized [block, A] IoU block: the running
  # best box per anchor (strict '>' in slot order: the lowest slot on ties, as torch.max), and per
  # box its best anchor. A block holds every anchor, so each box's best IoU over all anchors is
  # known in its own step, and 'ties' tests the block's IoUs for equality with it there: one pass,
  # and the equality is exact (the maximum is one of the very values it is compared with). Small
  # blocks fold their rows into the running values one row at a time (unrolled: elementwise ops
  # that XLA fuses into one loop per carry); large ones through max/argmax reductions over the
  # block (XLA's column reductions: slower, same result).
  def step(carry, i):
    best_iou, best_gt, crowd_iou, best_anchor, tied = carry
    start = i * block
    boxes = jax.lax.dynamic_slice_in_dim(gt_boxes, start, block)
    offset, crowd_off, tie_off = (jax.lax.dynamic_slice_in_dim(x, start, block)
                                  for x in (match_offset, crowd_offset, tie_offset))
    iou = iou_with(boxes)
    if low_quality == "ties":
      box_best = jnp.max(iou, axis=1) + tie_off  # [block], over all anchors
    if unrolled:
      for row in range(block):
        quality = iou[row] + offset[row]
        better = quality > best_iou
        best_iou = jnp.where(better, quality, best_iou)
        best_gt = jnp.where(better, start + row, best_gt)
        if gt_is_crowd is not None:
          crowd_iou = jnp.maximum(crowd_iou, iou[row] + crowd_off[row])
        if low_quality == "ties":
          tied = tied | (iou[row] == box_best[row]).astype(jnp.int32)
    else:
      quality = iou + offset[:, None]
      block_best = jnp.max(quality, axis=0)
      better = block_best > best_iou
      best_iou = jnp.where(better, block_best, best_iou)
      best_gt = jnp.where(better, jnp.argmax(quality, axis=0).astype(jnp.int32) + start, best_gt)
      if gt_is_crowd is not None:
        crowd_iou = jnp.maximum(crowd_iou, jnp.max(iou + crowd_off[:, None], axis=0))
      if low_quality == "ties":
        tied = tied | jnp.any(iou == box_best[:, None], axis=0).astype(jnp.int32)
    if low_quality == "force":  # the first anchor of highest IoU (invalid slots: dropped below)
      best_anchor = jax.lax.dynamic_update_slice_in_dim(
          best_anchor, jnp.argmax(iou, axis=1).astype(jnp.int32), start, 0)
    return (best_iou, best_gt, crowd_iou, best_anchor, tied), None

  # Carries built "like" an IoU row, so that they have its type under shard_map (varying axes).
  template = jnp.zeros_like(iou_with(gt_boxes[:1])[0])
  per_gt = jnp.zeros_like(gt_boxes[:, 0])
  init = (template - 1.0, template.astype(jnp.int32), template - 1.0, per_gt.astype(jnp.int32),
          template.astype(jnp.int32))
  (best_iou, gt_index, crowd_iou, best_anchor, tied), _ = jax.lax.scan(
      step, init, jnp.arange(num_blocks, dtype=jnp.int32))
  has_gt = jnp.any(matchable)

  state = jnp.where(best_iou >= positive_threshold, POSITIVE,
                    jnp.where(best_iou < negative_threshold, NEGATIVE, IGNORE))
  if low_quality == "ties":
    state = jnp.where(tied > 0, POSITIVE, state)
  elif low_quality == "force":
    target = jnp.where(matchable, best_anchor, num_anchors)  # out of range: dropped
    gt_index = gt_index.at[target].set(jnp.arange(padded, dtype=jnp.int32), mode="drop")
    forced = jnp.zeros((num_anchors,), bool).at[target].set(True, mode="drop")
    state = jnp.where(forced, POSITIVE, state)

  state = jnp.where(has_gt, state, NEGATIVE)
  gt_index = jnp.where(has_gt, gt_index, 0)
  if gt_is_crowd is not None:
    near_crowd = (crowd_iou >= negative_threshold) & (crowd_iou > best_iou)
    state = jnp.where(near_crowd, IGNORE, state)
  return MatchResult(gt_index=gt_index, state=state.astype(jnp.int32),
                     max_iou=jnp.where(has_gt, best_iou, 0.0))


def batch_match_anchors(anchors, gt_boxes, gt_mask, *, gt_is_crowd=None, **kwargs) -> MatchResult:
  """`match_anchors` over a batch: `anchors [A, 4]`, `gt_boxes [B, M, 4]`, masks `[B, M]` -> `[B, A]`."""
  if gt_boxes.ndim != 3:
    raise ValueError(f"gt_boxes must be [B, M, 4], got {tuple(gt_boxes.shape)}")
  if gt_is_crowd is None:
    return jax.vmap(lambda b, m: match_anchors(anchors, b, m, **kwargs))(gt_boxes, gt_mask)
  return jax.vmap(lambda b, m, c: match_anchors(anchors, b, m, gt_is_crowd=c, **kwargs))(
      gt_boxes, gt_mask, gt_is_crowd)


def classification_targets(match: MatchResult, gt_labels, *, ignore_label: int = -2,
                           background_label: int = -1):
  """Integer class target per anchor from a match: `[..., A]` int32.

  `gt_labels [..., M]` holds classes in `0..K-1`. Positives take their box's class, negatives
  `background_label` (-1) and ignored anchors `ignore_label` (-2): the input of
  `losses.sigmoid_focal_loss_from_labels`.
  """
  labels = jnp.take_along_axis(gt_labels.astype(jnp.int32), match.gt_index, axis=-1)
  return jnp.where(match.state == POSITIVE, labels,
                   jnp.where(match.state == NEGATIVE, background_label, ignore_label))
