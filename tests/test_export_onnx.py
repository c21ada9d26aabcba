"""retinanet_jax/deploy/onnx_format.py's post-processing graph (ONNX NonMaxSuppression, ScatterND, TopK,
GatherND) run by onnxruntime against `postprocess.class_wise_nms` (jitted) on the same candidates:
identical detections on random candidates with distinct scores, and the threshold and degenerate-box
edge cases written out by hand. (The whole exported detector: tests/test_export.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper

from retinanet_jax.deploy import export, onnx_format as export_onnx
from retinanet_jax import postprocess


def run_onnx_nms(boxes, scores, classes, *, num_classes, spec):
  """The export's NMS graph alone, on candidates `boxes [B, N, 4]`, `scores [B, N]` (-inf: not a
  candidate), `classes [B, N]`."""
  batch, num = scores.shape
  nodes, initializers, outputs = export_onnx._nms_graph(batch, num, spec=spec)  # pylint: disable=protected-access
  names = export_onnx._CANDIDATE_NAMES  # pylint: disable=protected-access
  inputs = [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, [batch, num, 4]),
            helper.make_tensor_value_info(names[1], TensorProto.FLOAT, [batch, num_classes, num]),
            helper.make_tensor_value_info(names[2], TensorProto.FLOAT, [batch, num]),
            helper.make_tensor_value_info(names[3], TensorProto.INT32, [batch, num])]
  model = helper.make_model(helper.make_graph(nodes, "nms", inputs, outputs, initializers),
                            opset_imports=[helper.make_opsetid("", export_onnx.OPSET)], ir_version=10)
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  class_scores = np.where(classes[:, None, :] == np.arange(num_classes)[None, :, None],
                          scores[:, None, :], -np.inf).astype(np.float32)
  result = session.run(None, dict(zip(names, (boxes, class_scores, scores, classes))))
  return dict(zip([o.name for o in session.get_outputs()], result))


def run_jax_nms(boxes, scores, classes, *, spec):
  """`postprocess_detections`' NMS and padding on the same candidates."""

  @jax.jit
  def nms(boxes, scores, classes):
    def one(b, s, c):
      index, valid = postprocess.class_wise_nms(b, s, c, iou_threshold=spec.nms_threshold,
                                                max_detections=spec.max_detections)
      return {"boxes": jnp.where(valid[:, None], b[index], 0.0),
              "scores": jnp.where(valid, s[index], 0.0),
              "classes": jnp.where(valid, c[index], -1), "valid": valid}
    return jax.vmap(one)(boxes, scores, classes)

  return {k: np.asarray(v) for k, v in nms(boxes, scores, classes).items()}


def test_onnx_nms_equals_class_wise_nms_on_random_candidates():
  rng = np.random.default_rng(0)
  batch, num, num_classes = 2, 400, 3
  xy = rng.uniform(0, 100, (batch, num, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (batch, num, 2))], -1).astype(np.float32)
  scores = rng.permutation(np.linspace(0.06, 0.99, batch * num)).reshape(batch, num)  # distinct
  scores = np.where(rng.uniform(size=(batch, num)) < 0.2, -np.inf, scores).astype(np.float32)
  classes = rng.integers(0, num_classes, (batch, num)).astype(np.int32)
  spec = export.ExportSpec(image_size=(128, 128), batch_size=batch, max_detections=num)
  ours = run_onnx_nms(boxes, scores, classes, num_classes=num_classes, spec=spec)
  reference = run_jax_nms(boxes, scores, classes, spec=spec)
  kept = reference["valid"].sum(axis=1)
  assert 50 < kept.min() and kept.max() < 0.8 * num - 20  # many survivors, many suppressed
  for name in export.OUTPUT_NAMES:
    np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)


def test_onnx_nms_edge_cases_by_hand():
  """IoU exactly at the threshold keeps both boxes (both use IoU > threshold); a larger IoU
  suppresses; the class separates; zero-area boxes (clipped away) suppress nothing, not even each
  other; a non-candidate (-inf) is never kept; equal scores of boxes that do not overlap come in
  index order (TopK and argmax); the rows after the survivors are padding."""
  boxes = np.array([[[0, 0, 10, 10],     # 0: kept
                     [0, 0, 10, 5],      # 1: IoU with 0 = 50 / 100 = 0.5 exactly: kept
                     [0, 0, 10, 6],      # 2: IoU with 0 = 0.6: suppressed
                     [0, 0, 10, 10],     # 3: same box as 0, other class: kept
                     [20, 20, 20, 30],   # 4: zero area: kept
                     [20, 20, 20, 30],   # 5: the same zero-area box: kept
                     [50, 50, 60, 60],   # 6: not a candidate
                     [70, 70, 80, 80],   # 7: tied with 8, no overlap: kept, before 8
                     [90, 90, 95, 95]]], np.float32)  # 8
  scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, -np.inf, 0.3, 0.3]], np.float32)
  classes = np.array([[0, 0, 0, 1, 0, 0, 0, 0, 0]], np.int32)
  spec = export.ExportSpec(image_size=(128, 128), batch_size=1, max_detections=9)
  ours = run_onnx_nms(boxes, scores, classes, num_classes=2, spec=spec)
  reference = run_jax_nms(boxes, scores, classes, spec=spec)
  kept = [0, 1, 3, 4, 5, 7, 8]
  np.testing.assert_array_equal(ours["valid"][0], [True] * 7 + [False] * 2)
  np.testing.assert_array_equal(ours["scores"][0, :7], scores[0, kept])
  np.testing.assert_array_equal(ours["boxes"][0, :7], boxes[0, kept])
  np.testing.assert_array_equal(ours["classes"][0], [0, 0, 1, 0, 0, 0, 0, -1, -1])
  np.testing.assert_array_equal(ours["boxes"][0, 7:], 0.0)
  for name in export.OUTPUT_NAMES:
    np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)



def test_max_pool_rewrite_equals_reduce_window_and_refuses_other_windows():
  """The spatial NHWC max pool handed to jax2onnx equals XLA's reduce_window max; a window over
  channels is refused with the supported form named."""
  x = np.random.default_rng(5).normal(size=(2, 9, 11, 3)).astype(np.float32)
  args = dict(window_dimensions=(1, 3, 3, 1), window_strides=(1, 2, 2, 1),
              padding=((0, 0), (1, 1), (1, 1), (0, 0)), base_dilation=(1,) * 4,
              window_dilation=(1,) * 4)
  ours = jax.jit(lambda v: export_onnx._max_pool_3d(v, **args))(x)  # pylint: disable=protected-access
  reference = jax.lax.reduce_window(x, -np.inf, jax.lax.max, args["window_dimensions"],
                                    args["window_strides"], args["padding"])
  np.testing.assert_array_equal(ours, reference)
  with pytest.raises(ValueError, match=r"spatial NHWC max pooling only .* window \(1, 3, 3, 2\)"):
    export_onnx._max_pool_3d(x, **{**args, "window_dimensions": (1, 3, 3, 2)})  # pylint: disable=protected-access
