"""The function every export format holds: the input normalization, the network, box decoding,
per-level top-k and class-wise NMS of a loaded model, with what is fixed at export (`ExportSpec`) and
how a caller resizes a photo for it (`input_resize`). The formats: deploy/stablehlo.py,
deploy/onnx_format.py; the entry point: deploy/export.py."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import postprocess
from retinanet_jax.models import preprocessing

DEFAULT_IMAGE_SIZE = (800, 1344)  # torchvision's 800/1333 resize, padded to a multiple of 32
OUTPUT_NAMES = ("boxes", "scores", "classes", "valid")
FIXED_BATCH_MESSAGES = {
    "savedmodel": "a SavedModel needs a fixed batch size (--batch_size=N): TensorFlow 2.21's "
                  "XlaCallModule cannot refine the symbolic batch through the top-k of the "
                  "post-processing ('stablehlo.sort' op has dynamic shapes); the StableHLO export "
                  "keeps the batch symbolic",
    "onnx": "an ONNX model needs a fixed batch size (--batch_size=N): the jaxpr that jax2onnx "
            "converts is traced beforehand, at a fixed shape (deploy/onnx_format.py); the StableHLO "
            "export keeps the batch symbolic",
}


@dataclasses.dataclass(frozen=True)
class ExportSpec:
  """What is fixed in the exported graph.

  Attributes:
    image_size: `(H, W)` of the input canvas.
    batch_size: `B`, or None for a symbolic (any) batch size.
    score_threshold, topk_candidates, nms_threshold, max_detections: `postprocess_detections`'s.
  """

  image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
  batch_size: Optional[int] = None
  score_threshold: float = 0.05
  topk_candidates: int = 1000
  nms_threshold: float = 0.5
  max_detections: int = 100

  def __post_init__(self):
    height, width = self.image_size
    if int(height) != height or int(width) != width or height < 1 or width < 1:
      raise ValueError(f"image_size must be two positive integers (H, W), got {self.image_size}")
    if self.batch_size is not None and (int(self.batch_size) != self.batch_size
                                        or self.batch_size < 1):
      raise ValueError(f"batch_size must be a positive integer or None (dynamic), got "
                       f"{self.batch_size}")

  def signature(self) -> dict:
    batch = "B" if self.batch_size is None else self.batch_size
    height, width = self.image_size
    detections = self.max_detections
    return {
        "inputs": {"images": {"dtype": "uint8", "shape": [batch, height, width, 3]},
                   "image_hw": {"dtype": "int32", "shape": [batch, 2]}},
        "outputs": {"boxes": {"dtype": "float32", "shape": [batch, detections, 4]},
                    "scores": {"dtype": "float32", "shape": [batch, detections]},
                    "classes": {"dtype": "int32", "shape": [batch, detections]},
                    "valid": {"dtype": "bool", "shape": [batch, detections]}},
        "box_format": "[x1, y1, x2, y2] pixels of the input canvas",
        "score_threshold": self.score_threshold, "topk_candidates": self.topk_candidates,
        "nms_threshold": self.nms_threshold, "max_detections": self.max_detections,
    }


def default_image_size(description) -> tuple[int, int]:
  """The canvas `(H, W)` for `description`'s model unless one is asked for: a 'fixed' model's
  `(S, S)` (every input is stretched to it), else `DEFAULT_IMAGE_SIZE`."""
  geometry = description.geometry
  if geometry is not None and geometry.mode == "fixed":
    return geometry.image_size, geometry.image_size
  return DEFAULT_IMAGE_SIZE


def input_resize(description) -> dict:
  """How a caller prepares the exported function's input from a photo of `h x w` pixels and maps
  its boxes back to the photo's pixels, from the model's geometry (`model_description.Geometry`;
  converted weights record none: torchvision's 800/1333). `signature.json`'s "input_resize"."""
  geometry = description.geometry
  if geometry is not None and geometry.mode == "fixed":
    side = geometry.image_size
    return {
        "mode": "fixed", "image_size": [side, side],
        "resize": f"stretch every photo to {side} x {side} (bilinear; the aspect ratio is not kept, "
                  f"as in training) at the top-left of the canvas; image_hw = [{side}, {side}]",
        "boxes_to_photo": f"per axis: sx = {side} / w, sy = {side} / h; x1 / sx, y1 / sy, x2 / sx, "
                          f"y2 / sy",
    }
  min_size, max_size = (800, 1333) if geometry is None else (geometry.min_size, geometry.max_size)
  return {
      "mode": "resize", "min_size": min_size, "max_size": max_size,
      "from": "torchvision's defaults (the model records no geometry)" if geometry is None
              else "the model's training (its evaluation resize)",
      "resize": f"keep the aspect ratio: s = min({min_size} / min(h, w), {max_size} / max(h, w)), "
                f"resize to (floor(h * s), floor(w * s)) (bilinear) at the top-left of the canvas "
                f"(which must hold it); image_hw = that size",
      "boxes_to_photo": "divide x by sx = resized width / w and y by sy = resized height / h (both "
                        "about s)",
  }


def network_function(loaded, *, spec: ExportSpec):
  """`f(state, images, image_hw) -> (cls_logits [B, A, K], box_deltas [B, A, 4], image_hw [B, 2])`:
  the input normalization and the network, `image_hw` clipped to the canvas; and that `state`.

  `loaded`: a `checkpoints.LoadedModel`."""
  description = loaded.description
  graphdef = loaded.graphdef
  height, width = spec.image_size

  def network(state, images, image_hw):
    params, rest = state
    model = nnx.merge(graphdef, params, rest)
    image_hw = jnp.clip(image_hw.astype(jnp.int32), 1, jnp.array([height, width], jnp.int32))
    inputs = preprocessing.normalize_images(images, image_hw,
                                            convention=description.input_convention)
    cls_logits, box_deltas = model(inputs)
    return cls_logits, box_deltas, image_hw

  return network, (loaded.params, loaded.rest)


def detection_function(loaded, *, spec: ExportSpec):
  """`f(state, images, image_hw) -> {boxes, scores, classes, valid}` (the module docstring's
  function with the model state as its first argument) and that `state` (a pytree of arrays).

  `loaded`: a `checkpoints.LoadedModel`."""
  network, state = network_function(loaded, spec=spec)
  anchor_set = anchor_lib.generate_anchors(spec.image_size, config=loaded.description.anchors)

  def detect(state, images, image_hw):
    cls_logits, box_deltas, image_hw = network(state, images, image_hw)
    detections = postprocess.postprocess_detections(
        cls_logits, box_deltas, anchors=anchor_set, image_hw=image_hw,
        score_threshold=spec.score_threshold, topk_candidates=spec.topk_candidates,
        nms_threshold=spec.nms_threshold, max_detections=spec.max_detections)
    return {name: getattr(detections, name) for name in OUTPUT_NAMES}

  return detect, state


def input_specs(spec: ExportSpec):
  """`(images, image_hw)` `jax.ShapeDtypeStruct`s, the batch symbolic when `spec.batch_size` is None."""
  batch = jax.export.symbolic_shape("b")[0] if spec.batch_size is None else spec.batch_size
  height, width = spec.image_size
  return (jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8),
          jax.ShapeDtypeStruct((batch, 2), jnp.int32))
