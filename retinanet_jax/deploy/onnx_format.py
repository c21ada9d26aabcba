"""ONNX export of the detector of `deploy/function.py` (same inputs, outputs and side files), run with
onnxruntime.

What is in the graph, and by whom:

  * `jax2onnx` converts the input normalization, the network, box decoding and the per-level top-k
    (`postprocess.detection_candidates`): `N` candidates per image with their boxes, scores and
    classes, exactly the ones our NMS receives;
  * ONNX's own `NonMaxSuppression` op (one call, all classes: per-class scores `[B, K, N]` that are
    `-inf` outside a candidate's class), then `ScatterND` + `TopK` keep the best `D` survivors per
    image in descending score order and `GatherND` + `Where` give the fixed-size outputs.

Our own NMS (`postprocess.class_wise_nms`, a `fori_loop` under `vmap`) does not go through jax2onnx
0.17.1: its `fori_loop` replacement has no batching rule, and the `scan` it converts the loop to fails
in onnxruntime ("Reshape ... cannot be reshaped", batched or not). Two other jax2onnx 0.17.1 defects
are worked around here, not in the model code: `nnx.max_pool`'s explicit padding is dropped (a 47 x 63
map instead of 48 x 64), and `lax.reduce_window_max` on NHWC becomes a 4-D `MaxPool` that onnxruntime
rejects ("Unsupported pooling size"). So the function is traced to a jaxpr first and evaluated
primitive by primitive under jax2onnx (`_inline`), with NHWC max pooling written as a 3-D pool over
`[B * C, H, W]` (the same maxima).

Semantics of ONNX's NonMaxSuppression in onnxruntime 1.31 (`nms_helpers::SuppressByIOU`) against
`class_wise_nms`: the same rules (a box is kept if its score > `score_threshold`; suppressed by a kept
box of its class with IoU > `nms_threshold`; IoU without +1; zero-area boxes suppress nothing); the
best `D` over all classes of the per-class survivors are the first `D` rounds of our greedy class-wise
NMS. They can differ only (1) in the order in which exactly tied scores of one class are visited
(onnxruntime: a heap, unspecified; ours: the lower candidate index), which changes the result only if
the tied boxes overlap by more than the threshold; (2) where an IoU is within float32 rounding of the
threshold (both compute `inter / (area1 + area2 - inter)` in float32, but XLA may fuse it differently);
and (3) as the network's float32
results differ between onnxruntime and XLA (measured ~1e-7 in score), candidates whose scores differ
by less than that can swap places in the output. The tests compare detections as matched sets.

The batch size is fixed at export (default 1): jax2onnx's symbolic dimensions and a jaxpr traced
beforehand do not share a scope. Requires `jax2onnx==0.17.1` (installed with `--no-deps`, docs/deploy.md
"Deploy") and `onnx`; running the artifact needs only `onnxruntime`.
"""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jax_core

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import postprocess
from retinanet_jax.deploy import function as export

ONNX_FILE = "model.onnx"
OPSET = 23
_CANDIDATE_NAMES = ("candidate_boxes", "candidate_class_scores", "candidate_scores",
                    "candidate_classes")


def _max_pool_3d(x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation):
  """`reduce_window_max` over NHWC with a `(1, h, w, 1)` window, as a pool over `[B * C, H, W]`."""
  if (window_dimensions[0] != 1 or window_dimensions[3] != 1 or window_strides[0] != 1
      or window_strides[3] != 1 or any(d != 1 for d in (*base_dilation, *window_dilation))
      or padding[0] != (0, 0) or padding[3] != (0, 0)):
    raise ValueError(f"ONNX export converts spatial NHWC max pooling only (window and strides 1 "
                     f"on batch and channels, no dilation); got window {window_dimensions} strides "
                     f"{window_strides} padding {padding}")
  batch, height, width, channels = x.shape
  y = jnp.transpose(x, (0, 3, 1, 2)).reshape(batch * channels, height, width)
  y = lax.reduce_window(y, np.array(-np.inf, x.dtype), lax.max, (1, *window_dimensions[1:3]),
                        (1, *window_strides[1:3]), ((0, 0), *padding[1:3]))
  return jnp.transpose(y.reshape(batch, channels, *y.shape[1:]), (0, 2, 3, 1))


def _inline(closed, *args):
  """Evaluates the closed jaxpr `closed` on `args` primitive by primitive, inlining nested `jit` and
  custom-derivative calls (inference needs no derivative rules) and replacing 4-D max pooling by
  `_max_pool_3d`. Returns the list of outputs."""
  jaxpr = closed.jaxpr
  env = dict(zip(jaxpr.constvars, closed.consts))
  env.update(zip(jaxpr.invars, args))

  def read(var):
    return var.val if isinstance(var, jax_core.Literal) else env[var]

  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in ("jit", "pjit"):
      outputs = _inline(eqn.params["jaxpr"], *inputs)
    elif name in ("custom_jvp_call", "custom_vjp_call") and "call_jaxpr" in eqn.params:
      outputs = _inline(eqn.params["call_jaxpr"], *inputs)
    elif name == "reduce_window_max" and len(eqn.params["window_dimensions"]) == 4:
      outputs = [_max_pool_3d(inputs[0], **eqn.params)]
    else:
      outputs = eqn.primitive.bind(*inputs, **eqn.params)
      if not eqn.primitive.multiple_results:
        outputs = [outputs]
    env.update(zip(eqn.outvars, outputs))
  return [read(v) for v in jaxpr.outvars]


def candidate_function(loaded, *, spec):
  """`f(images, image_hw) -> (boxes [B, N, 4], class_scores [B, K, N], scores [B, N], classes
  [B, N])`, weights inlined: `postprocess.detection_candidates` after the network, padded to at
  least `D` candidates (score `-inf`), with `class_scores[b, k, n] = scores[b, n]` if `classes[b, n]
  == k` else `-inf` (the scores input of ONNX's NonMaxSuppression)."""
  network, state = export.network_function(loaded, spec=spec)
  state = jax.tree.map(jnp.asarray, state)
  anchor_set = anchor_lib.generate_anchors(spec.image_size, config=loaded.description.anchors)
  num_classes = loaded.description.model.num_classes

  def candidates(images, image_hw):
    cls_logits, box_deltas, image_hw = network(state, images, image_hw)
    boxes, scores, classes = postprocess.detection_candidates(
        cls_logits, box_deltas, anchors=anchor_set, image_hw=image_hw,
        score_threshold=spec.score_threshold, topk_candidates=spec.topk_candidates)
    missing = spec.max_detections - scores.shape[1]
    if missing > 0:  # TopK needs D candidates
      boxes = jnp.pad(boxes, ((0, 0), (0, missing), (0, 0)))
      scores = jnp.pad(scores, ((0, 0), (0, missing)), constant_values=-jnp.inf)
      classes = jnp.pad(classes, ((0, 0), (0, missing)))
    in_class = classes[:, None, :] == jnp.arange(num_classes, dtype=classes.dtype)[None, :, None]
    class_scores = jnp.where(in_class, scores[:, None, :], -jnp.inf)
    return boxes, class_scores, scores, classes

  return candidates


def _nms_graph(batch: int, num_candidates: int, *, spec):
  """Nodes and initializers that turn the four candidate tensors into `boxes, scores, classes,
  valid` (module docstring)."""
  from onnx import TensorProto, helper  # optional extra (requirements-onnx.txt)  # pylint: disable=import-outside-toplevel

  def const(name, value, dtype):
    return helper.make_tensor(name, dtype, np.shape(value), np.ravel(value).tolist())

  boxes, class_scores, scores, classes = _CANDIDATE_NAMES
  initializers = [
      const("nms_max_per_class", [spec.max_detections], TensorProto.INT64),
      const("nms_iou_threshold", [spec.nms_threshold], TensorProto.FLOAT),
      const("nms_score_threshold", [spec.score_threshold], TensorProto.FLOAT),
      const("nms_batch_and_box", [0, 2], TensorProto.INT64),
      const("nms_not_kept", np.full((batch, num_candidates), -1.0), TensorProto.FLOAT),
      const("nms_k", [spec.max_detections], TensorProto.INT64),
      const("nms_zero", 0.0, TensorProto.FLOAT),
      const("nms_minus_one", -1, TensorProto.INT32),
      const("nms_last_axis", [-1], TensorProto.INT64),
  ]
  node = helper.make_node
  nodes = [
      # selected [M, 3] = (batch, class, candidate); each candidate has one class
      node("NonMaxSuppression", [boxes, class_scores, "nms_max_per_class", "nms_iou_threshold",
                                 "nms_score_threshold"], ["nms_selected"], center_point_box=0),
      node("Gather", ["nms_selected", "nms_batch_and_box"], ["nms_selected_bn"], axis=1),
      node("GatherND", [scores, "nms_selected_bn"], ["nms_selected_scores"]),
      # kept [B, N]: the score of each NMS survivor, -1 elsewhere (scores are >= 0)
      node("ScatterND", ["nms_not_kept", "nms_selected_bn", "nms_selected_scores"], ["nms_kept"]),
      # the D best survivors, descending (TopK: ties in index order, as our NMS's argmax)
      node("TopK", ["nms_kept", "nms_k"], ["nms_top_scores", "nms_top_index"], axis=1, largest=1,
           sorted=1),
      node("GreaterOrEqual", ["nms_top_scores", "nms_zero"], ["valid"]),
      node("Unsqueeze", ["nms_top_index", "nms_last_axis"], ["nms_top_index_1"]),
      node("GatherND", [boxes, "nms_top_index_1"], ["nms_top_boxes"], batch_dims=1),
      node("GatherND", [classes, "nms_top_index_1"], ["nms_top_classes"], batch_dims=1),
      node("Unsqueeze", ["valid", "nms_last_axis"], ["nms_valid_1"]),
      node("Where", ["nms_valid_1", "nms_top_boxes", "nms_zero"], ["boxes"]),
      node("Where", ["valid", "nms_top_scores", "nms_zero"], ["scores"]),
      node("Where", ["valid", "nms_top_classes", "nms_minus_one"], ["classes"]),
  ]
  detections = spec.max_detections
  outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, detections, 4]),
             helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, detections]),
             helper.make_tensor_value_info("classes", TensorProto.INT32, [batch, detections]),
             helper.make_tensor_value_info("valid", TensorProto.BOOL, [batch, detections])]
  return nodes, initializers, outputs


@contextlib.contextmanager
def _quiet_jax2onnx():
  """jax2onnx imports every plugin module at conversion and logs a warning with a traceback for each
  one whose library is absent (equinox, dm_pix: plugins this model does not use), and onnx_ir warns
  that it skips the type of intermediate values it could not infer (onnxruntime infers them)."""
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def check_available() -> None:
  """Raises ImportError, saying how to install them, if jax2onnx or onnx are missing."""
  try:
    # The optional ONNX extra (requirements-onnx.txt): imported only to see whether it is there.
    import jax2onnx  # optional extra  # pylint: disable=import-outside-toplevel,unused-import
    import onnx  # optional extra  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ImportError(f"ONNX export needs onnx and jax2onnx ({e}); install them as docs/deploy.md "
                      f"says: pip install onnx==1.23.2 onnx-ir==1.1.0 onnxruntime==1.31.1 && "
                      f"pip install --no-deps jax2onnx==0.17.1") from e


def export_onnx(loaded, path: str, *, spec) -> None:
  """Writes the ONNX model (opset 23) of the detection function to `path` (a new file): inputs
  `images` uint8 `[B, H, W, 3]` and `image_hw` int32 `[B, 2]`, outputs `boxes`, `scores`,
  `classes`, `valid` (`export.py`), `B = spec.batch_size` fixed, weights as initializers. `loaded`:
  a float32 `checkpoints.LoadedModel`."""
  if spec.batch_size is None:
    raise ValueError(export.FIXED_BATCH_MESSAGES["onnx"])
  import jax2onnx  # optional extra (requirements-onnx.txt)  # pylint: disable=import-outside-toplevel
  import onnx  # optional extra  # pylint: disable=import-outside-toplevel

  images_spec, image_hw_spec = export.input_specs(spec)
  candidates = candidate_function(loaded, spec=spec)
  closed = jax.make_jaxpr(candidates)(images_spec, image_hw_spec)
  num_candidates = closed.out_avals[0].shape[1]
  with _quiet_jax2onnx():
    model = jax2onnx.to_onnx(lambda images, image_hw: tuple(_inline(closed, images, image_hw)),
                             [images_spec, image_hw_spec], model_name="retinanet", opset=OPSET,
                             input_names=["images", "image_hw"], output_names=_CANDIDATE_NAMES)
  nodes, initializers, outputs = _nms_graph(spec.batch_size, num_candidates, spec=spec)
  graph = model.graph
  graph.node.extend(nodes)
  graph.initializer.extend(initializers)
  del graph.output[:]
  graph.output.extend(outputs)
  model.doc_string = (f"RetinaNet detector: images uint8 [{spec.batch_size}, {spec.image_size[0]}, "
                      f"{spec.image_size[1]}, 3], image_hw int32 [{spec.batch_size}, 2] -> boxes, "
                      f"scores, classes, valid (signature.json)")
  onnx.checker.check_model(model)
  with open(path, "xb") as f:
    f.write(model.SerializeToString())
