"""Anchor labelling: from padded ground truth to the fixed-shape targets the loss reads.

`label_anchors(anchors, gt_boxes, gt_labels, gt_mask, ...) -> AnchorTargets` is the first of the two
steps of detectron2's `label_anchors` / `losses` split (AXLearn: labeler, then metric): it matches
every anchor (`matching.batch_match_anchors`), then gives each one its class target and, for
positives, the ground-truth box it regresses to. `losses.retinanet_losses` takes these targets; the
normalizer and the cross-device collectives belong to the train step.

Shapes: `B` images, `A` anchors, `M` padded ground-truth slots. Boxes `[x1, y1, x2, y2]` in pixels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from retinanet_jax import matching

BACKGROUND = -1  # negative for every class
IGNORE = -2  # no classification loss

# The box non-positive anchors carry as their "matched" box: any finite box keeps masked gradients
# free of NaN and inf.
UNIT_BOX = (0.0, 0.0, 1.0, 1.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AnchorTargets:
  """What the loss needs to know about each anchor (all `[B, A, ...]`, fixed shapes).

  Attributes:
    labels: int32 `[B, A]`: the matched box's class in `0..K-1` for positives, `BACKGROUND` (-1) for
      negatives, `IGNORE` (-2) for anchors between the thresholds or near a crowd box.
    positive: bool `[B, A]`, `labels >= 0`.
    matched_boxes: float32 `[B, A, 4]`, the ground-truth box of each positive anchor; `UNIT_BOX`
      elsewhere.
    num_positives: float32 scalar, positive anchors in this batch (this device's share only).
  """

  labels: jax.Array
  positive: jax.Array
  matched_boxes: jax.Array
  num_positives: jax.Array


def label_anchors(anchors, gt_boxes, gt_labels, gt_mask, *, gt_is_crowd=None,
                  positive_threshold: float = 0.5, negative_threshold: float = 0.4,
                  low_quality: str = "ties", block_size: int = 0) -> AnchorTargets:
  """Targets of every anchor of a batch (module docstring); jit/vmap-compatible.

  Args:
    anchors: float `[A, 4]`, `xyxy` pixels (`anchors.generate_anchors(...).boxes`).
    gt_boxes: float `[B, M, 4]`, `xyxy` pixels; gt_labels: int `[B, M]` in `0..K-1`;
    gt_mask: bool `[B, M]`, True for real boxes; gt_is_crowd: optional bool `[B, M]`.
    positive_threshold, negative_threshold, low_quality, block_size: as in
      `matching.match_anchors` (block_size changes memory and speed, never the targets).

  Returns:
    `AnchorTargets`.
  """
  if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4:
    raise ValueError(f"gt_boxes must be [B, M, 4], got {tuple(gt_boxes.shape)}")
  if gt_labels.shape != gt_boxes.shape[:2] or gt_mask.shape != gt_boxes.shape[:2]:
    raise ValueError(f"gt_labels and gt_mask must be [B, M] = {gt_boxes.shape[:2]}, got "
                     f"{tuple(gt_labels.shape)} and {tuple(gt_mask.shape)}")
  anchors = jnp.asarray(anchors, jnp.float32)
  if anchors.ndim != 2 or anchors.shape[-1] != 4:
    raise ValueError(f"anchors must be [A, 4], got {tuple(anchors.shape)}")
  match = matching.batch_match_anchors(
      anchors, gt_boxes, gt_mask, gt_is_crowd=gt_is_crowd, positive_threshold=positive_threshold,
      negative_threshold=negative_threshold, low_quality=low_quality, block_size=block_size)
  positive = match.state == matching.POSITIVE
  labels = matching.classification_targets(match, gt_labels, ignore_label=IGNORE,
                                           background_label=BACKGROUND)
  matched = jnp.take_along_axis(jnp.asarray(gt_boxes, jnp.float32), match.gt_index[..., None],
                                axis=1)
  matched = jnp.where(positive[..., None], matched, jnp.asarray(UNIT_BOX, jnp.float32))
  return AnchorTargets(labels=labels, positive=positive, matched_boxes=matched,
                       num_positives=jnp.sum(positive).astype(jnp.float32))
