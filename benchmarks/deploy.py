"""The deploy suite: latency of each exported form of the detector (retinanet_jax/deploy/export.py), batch 1,
at 512x512 and 800x1333 (canvas 800x1344), against the in-process jitted model and torchvision.

Five ways to get the same detections, all timed in one round-robin (A B C D E, E D C B A, ...; medians
of wall-clock and CPU time), each call from uint8 pixels to the fixed-size outputs:

  in-process  `jax.jit(models.retinanet.detect)` on the model (what scripts/detect.py runs);
  StableHLO   `jax.export.deserialize(...)`, `jax.jit(exported.call)` (symbolic batch, refined at 1);
  SavedModel  `tf.saved_model.load(...).signatures['serving_default']` in TensorFlow (batch 1);
  ONNX        `onnxruntime.InferenceSession` (CPU provider, default options; batch 1; NMS is ONNX's
              NonMaxSuppression);
  torchvision `RetinaNet` in eval mode under `inference_mode` (the peer column of every row).

The networks are the model suite's: torchvision's R50-FPN layout with random "informative" weights,
converted to ours, so all five run the same weights (TINY_NET at 96x96 in --quick). Each row's note
gives the form's time over the in-process model's, and the largest difference of its sorted valid
scores from the in-process model's (a check that the form computes the same detections).
"""

from __future__ import annotations

import os
import tempfile
import time

from benchmarks import networks
from benchmarks.networks import FULL_NET, TINY_NET
from benchmarks.timing import Row, Session, block, round_robin

FORMS = ("in-process jit", "StableHLO (jax.export)", "SavedModel (TensorFlow)", "ONNX (onnxruntime)")


def _loaded_model(torch_model, spec):
  """Our model with the torchvision model's weights, as `checkpoints.load_model` returns it."""
  from flax import nnx

  from retinanet_jax import anchors as anchor_lib
  from retinanet_jax import checkpoints
  from retinanet_jax.data.labels import LabelMap
  from retinanet_jax.checkpoints.model_description import ModelDescription
  from retinanet_jax.models import retinanet

  config = retinanet.RetinaNetConfig(**spec.our_fields())
  model = nnx.eval_shape(lambda: retinanet.build_model(config, rngs=nnx.Rngs(0)))
  checkpoints.load_into(model, networks.converted_state(torch_model, spec))
  model.eval()
  label_map = LabelMap(tuple(range(1, spec.num_classes + 1)),
                       tuple(f"class {k}" for k in range(spec.num_classes)))
  description = ModelDescription(kind="retinanet", model=config, anchors=anchor_lib.AnchorConfig(),
                                 input_convention="torchvision", label_map=label_map)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return checkpoints.LoadedModel(graphdef=graphdef, params=params, rest=rest,
                                 description=description, step=None)


def _runners(loaded, canvas, directory):
  """`{form: f(images, image_hw) -> dict of NumPy outputs}` for the four forms of ours, and the
  seconds each export took."""
  import jax
  import numpy as np
  import onnxruntime as ort
  import tensorflow as tf

  from retinanet_jax.deploy import export
  from retinanet_jax.models import retinanet

  from flax import nnx

  graphdef, state = nnx.split(loaded.module())
  description = loaded.description

  @jax.jit
  def in_process(state, images, image_hw):
    d = retinanet.detect(nnx.merge(graphdef, state), images, image_hw,
                         jax.numpy.ones((1, 2), jax.numpy.float32),
                         anchor_config=description.anchors,
                         convention=description.input_convention, max_detections=100)
    return {k: getattr(d, k) for k in export.OUTPUT_NAMES}

  export_seconds = {}
  paths = {}
  for fmt, batch in (("stablehlo", None), ("savedmodel", 1), ("onnx", 1)):
    paths[fmt] = os.path.join(directory, fmt)
    start = time.perf_counter()
    export.export_model(loaded, paths[fmt], fmt=fmt,
                        spec=export.ExportSpec(image_size=canvas, batch_size=batch))
    export_seconds[fmt] = time.perf_counter() - start

  with open(os.path.join(paths["stablehlo"], export.STABLEHLO_FILE), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  stablehlo = jax.jit(exported.call)
  serve = tf.saved_model.load(os.path.join(paths["savedmodel"], export.SAVED_MODEL_DIR)).signatures[
      "serving_default"]
  session = ort.InferenceSession(os.path.join(paths["onnx"], "model.onnx"),
                                 providers=["CPUExecutionProvider"])
  onnx_names = [o.name for o in session.get_outputs()]
  to_numpy = lambda out: {k: np.asarray(v) for k, v in out.items()}
  runners = {
      FORMS[0]: lambda images, hw: to_numpy(block(in_process(state, images, hw))),
      FORMS[1]: lambda images, hw: to_numpy(block(stablehlo(images, hw))),
      FORMS[2]: lambda images, hw: {k: v.numpy() for k, v in serve(
          images=tf.constant(images), image_hw=tf.constant(hw)).items()},
      FORMS[3]: lambda images, hw: dict(zip(onnx_names, session.run(
          None, {"images": images, "image_hw": hw}))),
  }
  return runners, export_seconds


def _score_difference(out, reference) -> float:
  import numpy as np
  a = np.sort(out["scores"][out["valid"]])
  b = np.sort(reference["scores"][reference["valid"]])
  return float(np.abs(a - b).max()) if a.shape == b.shape and a.size else float("inf")


def bench_deploy(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  import numpy as np
  import torch

  spec = TINY_NET if quick else FULL_NET
  sizes = ((96, 96),) if quick else ((512, 512), (800, 1333))
  rng = np.random.default_rng(0)
  torch_model = networks.torchvision_retinanet(spec).eval()
  calibration = rng.integers(0, 256, (1,) + sizes[0] + (3,), dtype=np.uint8)
  networks.informative_weights(torch_model, networks.torch_images(calibration))
  loaded = _loaded_model(torch_model, spec)

  rows = []
  for h, w in sizes:
    canvas = (-(-h // 32) * 32, -(-w // 32) * 32)  # torchvision's size_divisible
    image = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    images = np.zeros((1,) + canvas + (3,), np.uint8)
    images[:, :h, :w] = image
    hw = np.array([[h, w]], np.int32)

    def peer():
      with torch.inference_mode():
        return torch_model(networks.torch_images(image))

    with tempfile.TemporaryDirectory() as directory:
      runners, export_seconds = _runners(loaded, canvas, directory)
      outputs = {form: run(images, hw) for form, run in runners.items()}  # compiles / warms up
      fns = {form: (lambda run=run: run(images, hw)) for form, run in runners.items()}
      times = round_robin({**fns, "torchvision": peer}, repeats)
    base = times[FORMS[0]]
    valid = int(outputs[FORMS[0]]["valid"].sum())
    for form, fmt in zip(FORMS, (None, "stablehlo", "savedmodel", "onnx")):
      note = f"{valid} detections"
      if fmt:
        note = (f"{times[form].wall / base.wall:.2f}x the in-process time; sorted scores within "
                f"{_score_difference(outputs[form], outputs[FORMS[0]]):.1g} of it; export "
                f"{export_seconds[fmt]:.0f} s")
      rows.append(Row("deploy", f"{form} {h}x{w} (canvas {canvas[0]}x{canvas[1]}), batch 1: "
                      "uint8 in, detections out", times[form], times["torchvision"], 0.0, note))
  return rows
