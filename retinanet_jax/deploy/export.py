"""Export a detector with its pre- and post-processing inside: StableHLO (`jax.export`), a
TensorFlow SavedModel (`jax2tf`) and ONNX (`jax2onnx` plus ONNX's NonMaxSuppression op,
`deploy/onnx_format.py`).

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
ONNX model; each runs with no code of this project (docs/deploy.md).
"""

from __future__ import annotations

import json
import os

from retinanet_jax.deploy import onnx_format
from retinanet_jax.deploy.function import (DEFAULT_IMAGE_SIZE, FIXED_BATCH_MESSAGES, OUTPUT_NAMES,
                                           ExportSpec, default_image_size, detection_function,
                                           input_resize, input_specs, network_function)
from retinanet_jax.deploy.stablehlo import (SAVED_MODEL_DIR, STABLEHLO_FILE, export_saved_model,
                                            export_stablehlo)

FORMATS = ("stablehlo", "savedmodel", "onnx")
SIGNATURE_FILE, DESCRIPTION_FILE, LABELS_FILE = "signature.json", "description.json", "labels.json"
__all__ = ["DEFAULT_IMAGE_SIZE", "DESCRIPTION_FILE", "FIXED_BATCH_MESSAGES", "FORMATS",
           "LABELS_FILE", "OUTPUT_NAMES", "SAVED_MODEL_DIR", "SIGNATURE_FILE", "STABLEHLO_FILE",
           "ExportSpec", "check_request", "default_image_size", "detection_function",
           "export_model", "export_saved_model", "export_stablehlo", "input_resize", "input_specs",
           "network_function", "write_side_files"]


def write_side_files(output_dir: str, description, *, spec: ExportSpec, fmt: str,
                     dtype: str) -> None:
  """`signature.json`, `description.json` and `labels.json` (module docstring)."""
  label_map = description.label_map
  nms = ("ONNX NonMaxSuppression (deploy/onnx_format.py)" if fmt == "onnx"
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
    onnx_format.check_available()


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
    onnx_format.export_onnx(loaded, os.path.join(output_dir, onnx_format.ONNX_FILE),
                            spec=spec)
  write_side_files(output_dir, loaded.description, spec=spec, fmt=fmt, dtype=dtype)
