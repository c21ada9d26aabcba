"""Export a detector with its pre- and post-processing inside: StableHLO (`jax.export`), a
TensorFlow SavedModel (`jax2tf`) and ONNX (`jax2onnx` plus ONNX's NonMaxSuppression op,
`export_onnx.py`).

The exported function (the same in all formats):

    detect(images: uint8 [B, H, W, 3], image_hw: int32 [B, 2])
      -> boxes float32 [B, D, 4], scores float32 [B, D], classes int32 [B, D], valid bool [B, D]

`images` are RGB pixels, each image at the top-left of the fixed `H x W` canvas (zero padding below
and right); `image_hw` is each image's valid (height, width) in that canvas (clipped to `[1, H] x
[1, W]`). Inside: the input normalization of the model's convention, the network, box decoding,
per-level top-k and class-wise NMS (`postprocess.py`), exactly as `models.retinanet.detect` with
`scale = 1`. Outputs: `D = max_detections` rows per image in descending score order, boxes
`[x1, y1, x2, y2]` in the pixels of `images` (clipped to the valid size), `classes` the contiguous
class index `0..K-1` (map it with `labels.json`), rows where `valid` is False are padding (zero box,
score 0, class -1). Resizing a photo to the canvas is the caller's, as the model's geometry says
(`input_resize`, written to `signature.json`): 'resize' keeps the aspect ratio (divide the boxes by
the resize factor to return to the photo's pixels); 'fixed' (a `data.mode='fixed'` model, e.g.
SARDet-100K's) stretches every photo to `S x S` (`image_hw = [S, S]`), and the boxes return per axis:
x / sx and y / sy with `sx = S / photo width`, `sy = S / photo height`. `H, W` are fixed at export
(the anchors are constants of the graph; `default_image_size`: `S x S` for a 'fixed' model); `B` is symbolic (any batch) in StableHLO unless a fixed size is asked for, and fixed in a
SavedModel (TensorFlow 2.21 cannot run the symbolic-batch module, `export_saved_model`) and in ONNX.

`export_model(loaded, output_dir, *, fmt, ...)` writes into a new (or empty) `output_dir`:

  model.stablehlo   `jax.export.Exported.serialize()` bytes     (fmt 'stablehlo')
  saved_model/      SavedModel, signature 'serving_default'     (fmt 'savedmodel')
  model.onnx        ONNX model (opset 23), inputs and outputs named as above (fmt 'onnx')
  signature.json    the inputs and outputs above, the thresholds, the format, and `input_resize`:
                    how to resize a photo into the canvas and map the boxes back (`input_resize`)
  description.json  the model description (`model_description.ModelDescription.to_json()`)
  labels.json       `[{"class": k, "category_id": ..., "name": ...}]`

Weights are constants of the StableHLO module, variables of the SavedModel and initializers of the
ONNX model; each runs with no code of this project (README "Deploy").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import postprocess
from retinanet_jax.models import preprocessing

FORMATS = ("stablehlo", "savedmodel", "onnx")
DEFAULT_IMAGE_SIZE = (800, 1344)  # torchvision's 800/1333 resize, padded to a multiple of 32
STABLEHLO_FILE, SAVED_MODEL_DIR = "model.stablehlo", "saved_model"
SIGNATURE_FILE, DESCRIPTION_FILE, LABELS_FILE = "signature.json", "description.json", "labels.json"
OUTPUT_NAMES = ("boxes", "scores", "classes", "valid")
FIXED_BATCH_MESSAGES = {
    "savedmodel": "a SavedModel needs a fixed batch size (--batch_size=N): TensorFlow 2.21's "
                  "XlaCallModule cannot refine the symbolic batch through the top-k of the "
                  "post-processing ('stablehlo.sort' op has dynamic shapes); the StableHLO export "
                  "keeps the batch symbolic",
    "onnx": "an ONNX model needs a fixed batch size (--batch_size=N): the jaxpr that jax2onnx "
            "converts is traced beforehand, at a fixed shape (export_onnx.py); the StableHLO export "
            "keeps the batch symbolic",
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


def export_stablehlo(loaded, *, spec: ExportSpec) -> jax.export.Exported:
  """The `jax.export.Exported` of the detection function, weights inlined as constants."""
  detect, state = detection_function(loaded, spec=spec)
  state = jax.tree.map(jnp.asarray, state)
  return jax.export.export(jax.jit(lambda images, image_hw: detect(state, images, image_hw)))(
      *input_specs(spec))


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
  """Serializes StableHLO for the consumer 12 weeks old instead of 4 while active.

  jax 0.10.2 writes StableHLO 1.15.0 (`WEEK_4`), in which `chlo.top_k` becomes a `vhlo.composite_v2`
  that TensorFlow 2.21's `XlaCallModule` (StableHLO 1.13.7) cannot read ("unregistered operation
  'vhlo.composite_v2'"); `WEEK_12` is 1.13.7. jax offers no public switch, so this replaces the
  private `jax._src.export._export._module_to_bytecode` for the duration of one conversion."""
  from jax._src.export import _export  # pylint: disable=import-outside-toplevel
  from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir.dialects import hlo  # pylint: disable=import-outside-toplevel

  original = _export._module_to_bytecode  # pylint: disable=protected-access

  def module_to_bytecode(module):
    target = hlo.get_version_from_compatibility_requirement(
        hlo.StablehloCompatibilityRequirement.WEEK_12)
    return _jax.mlir.serialize_portable_artifact(module, target,
                                                 jax.extend.backend.get_backend().serialize_with_sdy)

  _export._module_to_bytecode = module_to_bytecode  # pylint: disable=protected-access
  try:
    yield
  finally:
    _export._module_to_bytecode = original  # pylint: disable=protected-access


def export_saved_model(loaded, path: str, *, spec: ExportSpec) -> None:
  """A SavedModel at `path` with the signature 'serving_default' (inputs `images`, `image_hw`;
  outputs `boxes`, `scores`, `classes`, `valid`), weights as `tf.Variable`s, through `jax2tf`
  (native serialization: the same StableHLO inside an `XlaCallModule` op)."""
  if spec.batch_size is None:
    raise ValueError(FIXED_BATCH_MESSAGES["savedmodel"])
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel

  detect, state = detection_function(loaded, spec=spec)
  leaves, treedef = jax.tree.flatten(state)
  height, width = spec.image_size
  converted = jax2tf.convert(
      lambda flat, images, image_hw: detect(jax.tree.unflatten(treedef, flat), images, image_hw),
      with_gradient=False)
  module = tf.Module()
  module.variables_list = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]
  tf_batch = spec.batch_size

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec((tf_batch, height, width, 3), tf.uint8, name="images"),
      tf.TensorSpec((tf_batch, 2), tf.int32, name="image_hw")])
  def serve(images, image_hw):
    images = tf.ensure_shape(images, (tf_batch, height, width, 3), name="images")
    image_hw = tf.ensure_shape(image_hw, (tf_batch, 2), name="image_hw")
    return converted(module.variables_list, images, image_hw)

  module.serve = serve
  with _stablehlo_for_tensorflow():
    tf.saved_model.save(module, path, signatures={"serving_default": serve})


def write_side_files(output_dir: str, description, *, spec: ExportSpec, fmt: str,
                     dtype: str) -> None:
  """`signature.json`, `description.json` and `labels.json` (module docstring)."""
  label_map = description.label_map
  nms = ("ONNX NonMaxSuppression (export_onnx.py)" if fmt == "onnx"
         else "retinanet_jax.postprocess.class_wise_nms")
  signature = {"format": fmt, "dtype": dtype, **spec.signature(), "nms": nms,
               "input_resize": input_resize(description)}
  files = {SIGNATURE_FILE: signature, DESCRIPTION_FILE: description.to_json(),
           LABELS_FILE: [{"class": k, "category_id": int(c), "name": n}
                         for k, (c, n) in enumerate(zip(label_map.category_ids, label_map.names))]}
  for name, obj in files.items():
    with open(os.path.join(output_dir, name), "x") as f:
      json.dump(obj, f, indent=1)


def check_request(output_dir: str, *, fmt: str, spec: ExportSpec, dtype: str = "float32",
                  description=None) -> None:
  """Raises (ValueError, FileExistsError, ImportError) before any work if `export_model` cannot
  write this artifact: unknown format, `output_dir` not new or empty, a symbolic batch for a format
  that needs a fixed one, ONNX in bfloat16 or without jax2onnx / onnx installed, and (when the model
  `description` is given) a canvas smaller than a 'fixed' model's `S x S` input."""
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  geometry = None if description is None else description.geometry
  if geometry is not None and geometry.mode == "fixed" and (
      spec.image_size[0] < geometry.image_size or spec.image_size[1] < geometry.image_size):
    raise ValueError(f"the model stretches every image to {geometry.image_size} x "
                     f"{geometry.image_size} (geometry mode 'fixed'), which a canvas of "
                     f"{spec.image_size[0]} x {spec.image_size[1]} cannot hold; give --image_size="
                     f"{geometry.image_size},{geometry.image_size} (the default for this model) or "
                     f"larger")
  if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
    raise FileExistsError(f"{output_dir} exists and is not an empty directory; give a new --output "
                          f"(export never overwrites files)")
  if fmt in FIXED_BATCH_MESSAGES and spec.batch_size is None:
    raise ValueError(FIXED_BATCH_MESSAGES[fmt])
  if fmt == "onnx":
    if dtype != "float32":
      raise ValueError(f"the ONNX export is float32 only, got --dtype={dtype} (jax2onnx 0.17.1 "
                       f"converts no bfloat16 max pooling); bfloat16 is offered by stablehlo and "
                       f"savedmodel")
    from retinanet_jax import export_onnx  # pylint: disable=import-outside-toplevel
    export_onnx.check_available()


def export_model(loaded, output_dir: str, *, fmt: str, spec: ExportSpec,
                 dtype: str = "float32") -> None:
  """Writes the artifact of format `fmt` (a key of `FORMATS`) and its side files into `output_dir`,
  which must not exist or be empty (nothing is overwritten). `loaded`: a `checkpoints.LoadedModel`
  (`dtype` is only recorded: load the model with the dtype wanted)."""
  check_request(output_dir, fmt=fmt, spec=spec, dtype=dtype, description=loaded.description)
  os.makedirs(output_dir, exist_ok=True)
  if fmt == "stablehlo":
    exported = export_stablehlo(loaded, spec=spec)
    with open(os.path.join(output_dir, STABLEHLO_FILE), "xb") as f:
      f.write(exported.serialize())
  elif fmt == "savedmodel":
    export_saved_model(loaded, os.path.join(output_dir, SAVED_MODEL_DIR), spec=spec)
  else:
    from retinanet_jax import export_onnx  # pylint: disable=import-outside-toplevel
    export_onnx.export_onnx(loaded, os.path.join(output_dir, export_onnx.ONNX_FILE), spec=spec)
  write_side_files(output_dir, loaded.description, spec=spec, fmt=fmt, dtype=dtype)
