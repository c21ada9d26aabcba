"""Runs an exported detector as a deployment would: jax (StableHLO), TensorFlow (SavedModel) or
onnxruntime (ONNX) alone, no retinanet_jax code. `python run_exported.py FORMAT ARTIFACT_DIR INPUTS.npz OUTPUTS.npz` writes the
four outputs, plus `error_<case>` messages for inputs of a wrong dtype, rank and size."""

import json
import os
import sys

import numpy as np


def runner(fmt, directory):
  if fmt == "stablehlo":
    import jax  # pylint: disable=import-outside-toplevel
    with open(os.path.join(directory, "model.stablehlo"), "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    return lambda images, image_hw: {k: np.asarray(v) for k, v in exported.call(images, image_hw).items()}
  if fmt == "onnx":
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    session = ort.InferenceSession(os.path.join(directory, "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return lambda images, image_hw: dict(zip(names, session.run(
        None, {"images": images, "image_hw": image_hw})))
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  serve = tf.saved_model.load(os.path.join(directory, "saved_model")).signatures["serving_default"]
  return lambda images, image_hw: {k: v.numpy() for k, v in serve(
      images=tf.constant(images), image_hw=tf.constant(image_hw)).items()}


def main(fmt, directory, inputs_path, outputs_path):
  with open(os.path.join(directory, "signature.json")) as f:
    json.load(f)
  inputs = np.load(inputs_path)
  images, image_hw = inputs["images"], inputs["image_hw"]
  run = runner(fmt, directory)
  outputs = run(images, image_hw)
  bad = {"dtype": (images.astype(np.float32), image_hw), "rank": (images[0], image_hw),
         "size": (images[:, 1:], image_hw)}
  for case, args in bad.items():
    try:
      run(*args)
      outputs[f"error_{case}"] = np.array("no error")
    except Exception as e:  # pylint: disable=broad-except
      outputs[f"error_{case}"] = np.array(str(e)[:2000])
  loaded = sorted(m for m in sys.modules if m.startswith("retinanet_jax"))
  outputs["project_modules"] = np.array(json.dumps(loaded))
  np.savez(outputs_path, **outputs)


if __name__ == "__main__":
  main(*sys.argv[1:])
