"""Box formats, areas, IoU and GIoU, clipping, and the RetinaNet box coder.

Every function is pure jnp, so it works under `jax.jit`, `jax.vmap` and `jax.grad`.

Box formats (shape `[..., 4]`, float32):
  * `xyxy`: `[x1, y1, x2, y2]` in absolute pixels. The library's one internal format.
  * `xywh`: COCO's `[x, y, width, height]` in absolute pixels.
  * `cxcywh`: `[centre_x, centre_y, width, height]` in absolute pixels.
  * `yxyx_normalized`: TFDS's `[ymin, xmin, ymax, xmax]` as fractions of the image height and width.

Shapes: `N` and `M` are box counts; `...` are leading batch dimensions, identical on both sides of a
pairwise function.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

# torchvision / detectron2: the largest log-ratio a predicted width or height may take when decoding.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _check_last_dim(name: str, boxes) -> None:
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"{name} must have shape [..., 4], got {tuple(boxes.shape)}")


def box_area(boxes):
  """Area of `xyxy` boxes `[..., 4]` -> `[...]`. Inverted boxes (x2 < x1) have negative area."""
  _check_last_dim("boxes", boxes)
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_intersection_union(boxes1, boxes2):
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.clip(rb - lt, min=0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1[..., :, None] + area2[..., None, :] - inter
  return inter, union


def pairwise_iou(boxes1, boxes2):
  """Intersection over union of every pair: `[..., N, 4] x [..., M, 4] -> [..., N, M]`.

  Same definition as `torchvision.ops.box_iou` (no +1 on widths). A pair whose union is zero (two
  zero-area boxes) has IoU 0 rather than NaN, so that zero-area ground truth can never be matched.
  """
  _check_last_dim("boxes1", boxes1)
  _check_last_dim("boxes2", boxes2)
  inter, union = _pairwise_intersection_union(boxes1, boxes2)
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def pairwise_giou(boxes1, boxes2):
  """Generalized IoU of every pair: `[..., N, 4] x [..., M, 4] -> [..., N, M]`, in [-1, 1].

  As `torchvision.ops.generalized_box_iou`: IoU - (enclosing area - union) / enclosing area.
  """
  _check_last_dim("boxes1", boxes1)
  _check_last_dim("boxes2", boxes2)
  inter, union = _pairwise_intersection_union(boxes1, boxes2)
  iou = inter / union
  lt = jnp.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.clip(rb - lt, min=0)
  enclosing = wh[..., 0] * wh[..., 1]
  return iou - (enclosing - union) / enclosing


def elementwise_giou(boxes1, boxes2, *, eps: float = 1e-7):
  """Generalized IoU of matching rows: `[..., 4] x [..., 4] -> [...]`.

  As in `torchvision.ops.generalized_box_iou_loss` (eps guards empty unions/enclosures).
  """
  _check_last_dim("boxes1", boxes1)
  _check_last_dim("boxes2", boxes2)
  x1, y1, x2, y2 = jnp.moveaxis(boxes1, -1, 0)
  x1g, y1g, x2g, y2g = jnp.moveaxis(boxes2, -1, 0)
  xk1 = jnp.maximum(x1, x1g)
  yk1 = jnp.maximum(y1, y1g)
  xk2 = jnp.minimum(x2, x2g)
  yk2 = jnp.minimum(y2, y2g)
  inter = jnp.where((yk2 > yk1) & (xk2 > xk1), (xk2 - xk1) * (yk2 - yk1), 0.0)
  union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
  iou = inter / (union + eps)
  xc1 = jnp.minimum(x1, x1g)
  yc1 = jnp.minimum(y1, y1g)
  xc2 = jnp.maximum(x2, x2g)
  yc2 = jnp.maximum(y2, y2g)
  area_c = (xc2 - xc1) * (yc2 - yc1)
  return iou - (area_c - union) / (area_c + eps)


def clip_boxes(boxes, image_hw):
  """Clips `xyxy` boxes `[..., N, 4]` to `[0, width] x [0, height]`.

  `image_hw` is `(height, width)`: Python numbers, or an array `[..., 2]` with the leading dimensions
  of `boxes` (one size per image). Same as `torchvision.ops.clip_boxes_to_image`.
  """
  _check_last_dim("boxes", boxes)
  hw = jnp.asarray(image_hw, dtype=boxes.dtype)
  if hw.shape[-1:] != (2,):
    raise ValueError(f"image_hw must be (height, width) or [..., 2], got shape {tuple(hw.shape)}")
  height = hw[..., 0, None]
  width = hw[..., 1, None]
  x = jnp.clip(boxes[..., 0::2], 0, width)
  y = jnp.clip(boxes[..., 1::2], 0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def xyxy_to_xywh(boxes):
  """`[x1, y1, x2, y2]` -> COCO `[x, y, w, h]`, both in pixels, `[..., 4]`."""
  _check_last_dim("boxes", boxes)
  return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes):
  """COCO `[x, y, w, h]` -> `[x1, y1, x2, y2]`, both in pixels, `[..., 4]`."""
  _check_last_dim("boxes", boxes)
  return jnp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def xyxy_to_cxcywh(boxes):
  """`[x1, y1, x2, y2]` -> `[cx, cy, w, h]`, `[..., 4]`."""
  _check_last_dim("boxes", boxes)
  wh = boxes[..., 2:] - boxes[..., :2]
  return jnp.concatenate([boxes[..., :2] + 0.5 * wh, wh], axis=-1)


def cxcywh_to_xyxy(boxes):
  """`[cx, cy, w, h]` -> `[x1, y1, x2, y2]`, `[..., 4]`."""
  _check_last_dim("boxes", boxes)
  half = 0.5 * boxes[..., 2:]
  return jnp.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


def yxyx_normalized_to_xyxy(boxes, image_hw):
  """TFDS `[ymin, xmin, ymax, xmax]` in [0, 1] -> `[x1, y1, x2, y2]` pixels, `[..., 4]`.

  `image_hw` is `(height, width)` or `[..., 2]` matching the leading dimensions of `boxes`.
  """
  _check_last_dim("boxes", boxes)
  hw = jnp.asarray(image_hw, dtype=boxes.dtype)
  h, w = hw[..., 0, None], hw[..., 1, None]
  return jnp.stack(
      [boxes[..., 1] * w[..., 0], boxes[..., 0] * h[..., 0],
       boxes[..., 3] * w[..., 0], boxes[..., 2] * h[..., 0]], axis=-1)


def xyxy_to_yxyx_normalized(boxes, image_hw):
  """`[x1, y1, x2, y2]` pixels -> TFDS `[ymin, xmin, ymax, xmax]` in [0, 1], `[..., 4]`."""
  _check_last_dim("boxes", boxes)
  hw = jnp.asarray(image_hw, dtype=boxes.dtype)
  h, w = hw[..., 0, None], hw[..., 1, None]
  return jnp.stack(
      [boxes[..., 1] / h[..., 0], boxes[..., 0] / w[..., 0],
       boxes[..., 3] / h[..., 0], boxes[..., 2] / w[..., 0]], axis=-1)


def _centre_and_size(boxes):
  """`(cx, cy, w, h)`, each `[...]` float32, of `xyxy` boxes `[..., 4]` (torchvision's arithmetic)."""
  boxes = boxes.astype(jnp.float32)
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


@dataclasses.dataclass(frozen=True)
class BoxCoder:
  """Encodes boxes as deltas `(dx, dy, dw, dh)` relative to anchors, and decodes them back.

  The R-CNN parameterization used by RetinaNet (torchvision `det_utils.BoxCoder`, detectron2
  `Box2BoxTransform`):
    dx = wx * (gx - ax) / aw,  dy = wy * (gy - ay) / ah,  dw = ww * log(gw / aw),  dh = wh * log(gh / ah)
  with centres and sizes taken from `xyxy` boxes (width = x2 - x1, no +1). Decoding clamps dw and dh
  at `scale_clamp` (log(1000/16)) before the exponential, so no prediction can overflow.

  Invariant: `decode(encode(b, a), a) == b` (to float32 rounding) for boxes with positive size whose
  log-size ratio to the anchor is below the clamp. Everything is computed in float32.

  Attributes:
    weights: `(wx, wy, ww, wh)`; (1, 1, 1, 1) for RetinaNet in torchvision and detectron2.
    scale_clamp: upper bound on dw, dh when decoding.
  """

  weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
  scale_clamp: float = DEFAULT_SCALE_CLAMP

  def __post_init__(self):
    if len(self.weights) != 4 or any(w <= 0 for w in self.weights):
      raise ValueError(f"BoxCoder weights must be 4 positive numbers, got {self.weights}")

  def encode(self, boxes, anchors):
    """Deltas `[..., 4]` that turn `anchors [..., 4]` into `boxes [..., 4]` (both `xyxy`, broadcast)."""
    _check_last_dim("boxes", boxes)
    _check_last_dim("anchors", anchors)
    wx, wy, ww, wh = self.weights
    ax, ay, aw, ah = _centre_and_size(anchors)
    gx, gy, gw, gh = _centre_and_size(boxes)
    return jnp.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                      ww * jnp.log(gw / aw), wh * jnp.log(gh / ah)], axis=-1)

  def decode(self, deltas, anchors):
    """Boxes `[..., 4]` (`xyxy`, float32) from `deltas [..., 4]` applied to `anchors [..., 4]`."""
    _check_last_dim("deltas", deltas)
    _check_last_dim("anchors", anchors)
    deltas = deltas.astype(jnp.float32)
    wx, wy, ww, wh = self.weights
    ax, ay, aw, ah = _centre_and_size(anchors)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, self.scale_clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, self.scale_clamp)
    cx = dx * aw + ax
    cy = dy * ah + ay
    half_w = 0.5 * jnp.exp(dw) * aw
    half_h = 0.5 * jnp.exp(dh) * ah
    return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
