"""retinanet_jax/deploy/ (export.py, onnx_format.py) and scripts/export.py: each artifact, reloaded in a fresh
process that imports no retinanet_jax code (tests/helpers/run_exported.py), gives the in-process
model's detections (`models.retinanet.detect`) on real photos (scikit-image's bundled images) within
1e-3 px and 1e-5 in score (ONNX, whose NMS is onnxruntime's: the same detections as a set, module
docstring of deploy/onnx_format.py); wrong dtype, rank or size of input is an error naming the expected
signature. A model whose description's geometry is 'fixed' gets an S x S canvas by default and
side files that say to stretch and map back per axis."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import skimage.data
from flax import nnx

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import checkpoints
from retinanet_jax.deploy import export
from retinanet_jax.data.labels import LabelMap
from retinanet_jax.checkpoints.model_description import Geometry, ModelDescription
from retinanet_jax.models import preprocessing, retinanet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "helpers", "run_exported.py")
EXPORT_SCRIPT = os.path.join(REPO, "scripts", "export.py")
CANVAS = (192, 256)
NAMES = ("cat", "dog", "cup", "mug", "person")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A small random RetinaNet (ResNet-18, 32-channel FPN, 5 classes) saved as converted weights, its
  classification bias raised so that a few hundred candidates pass the 0.05 threshold."""
  config = retinanet.RetinaNetConfig(backbone="resnet18", fpn_channels=32, num_classes=5,
                                     head_num_convs=2)
  model = retinanet.build_model(config, rngs=nnx.Rngs(0))
  bias = model.head.classification.predictor.bias
  bias.value = jax.random.uniform(jax.random.key(1), bias.value.shape, minval=-3.0, maxval=-1.5)
  description = ModelDescription(kind="retinanet", model=config, anchors=anchor_lib.AnchorConfig(),
                                 input_convention="torchvision",
                                 label_map=LabelMap((1, 2, 3, 5, 8), NAMES))
  path = str(tmp_path_factory.mktemp("export_model") / "model")
  checkpoints.save_model(path, nnx.to_pure_dict(nnx.state(model)), description)
  return path


def photos():
  """Three bundled photos resized (torchvision's way) into the canvas: `(images [3, H, W, 3] uint8,
  image_hw [3, 2] int32)`."""
  resized = []
  for photo in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()):
    size = preprocessing.torchvision_resized_size(*photo.shape[:2], min_size=CANVAS[0],
                                                  max_size=CANVAS[1])
    resized.append(np.round(preprocessing.resize_bilinear(photo, size)).astype(np.uint8))
  images, image_hw = preprocessing.batch_images(resized, size_divisible=1, dtype=np.uint8)
  canvas = np.zeros((len(resized), *CANVAS, 3), np.uint8)
  canvas[:, :images.shape[1], :images.shape[2]] = images
  return canvas, image_hw


@pytest.fixture(scope="module")
def reference(model_dir):
  """The in-process float32 model's detections of `photos()`, `max_detections=50`."""
  return in_process(model_dir, *photos(), max_detections=50)


def in_process(path, images, image_hw, *, max_detections, dtype="float32"):
  loaded = checkpoints.load_model(path, dtype=dtype)
  d = retinanet.detect(loaded.module(), images, image_hw, np.ones((len(images), 2), np.float32),
                       anchor_config=loaded.description.anchors,
                       convention=loaded.description.input_convention,
                       max_detections=max_detections)
  return {k: np.asarray(getattr(d, k)) for k in export.OUTPUT_NAMES}


def run_fresh(fmt, directory, images, image_hw, tmp_path):
  np.savez(tmp_path / "inputs.npz", images=images, image_hw=image_hw)
  done = subprocess.run([sys.executable, RUNNER, fmt, str(directory), str(tmp_path / "inputs.npz"),
                         str(tmp_path / "outputs.npz")], capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  with np.load(tmp_path / "outputs.npz") as f:
    return {k: f[k] for k in f.files}


def assert_same_detections(ours, reference, *, box_tol=1e-3, score_tol=1e-5):
  np.testing.assert_array_equal(ours["valid"], reference["valid"])
  valid = reference["valid"]
  assert valid.sum(axis=1).min() > 20  # a real test: many detections in every photo
  np.testing.assert_array_equal(ours["classes"][valid], reference["classes"][valid])
  np.testing.assert_allclose(ours["boxes"][valid], reference["boxes"][valid], rtol=0, atol=box_tol)
  np.testing.assert_allclose(ours["scores"][valid], reference["scores"][valid], rtol=0, atol=score_tol)
  print("valid detections per image:", valid.sum(axis=1))
  assert (ours["classes"][~ours["valid"]] == -1).all()  # padding rows are marked


def assert_same_detection_sets(ours, reference, *, box_tol=1e-3, score_tol=1e-5):
  """Per image: as many valid rows, first; scores descending; each reference detection matched one
  to one by a detection of the same class with box within `box_tol` and score within `score_tol`
  (rows whose scores differ by less than float32 noise may come in another order)."""
  np.testing.assert_array_equal(ours["valid"].sum(axis=1), reference["valid"].sum(axis=1))
  assert reference["valid"].sum(axis=1).min() > 20  # a real test: many detections in every photo
  same_order = 0
  for b, count in enumerate(reference["valid"].sum(axis=1)):
    assert ours["valid"][b, :count].all() and (ours["classes"][b, count:] == -1).all()
    boxes, scores, classes = (ours[k][b, :count] for k in ("boxes", "scores", "classes"))
    assert (np.diff(scores) <= 0).all()
    used = np.zeros(count, bool)
    for row in range(count):
      box, score, cls = (reference[k][b, row] for k in ("boxes", "scores", "classes"))
      match = (~used & (classes == cls) & (np.abs(boxes - box).max(axis=1) <= box_tol)
               & (np.abs(scores - score) <= score_tol))
      assert match.any(), f"image {b}: reference row {row} ({cls}, {box}, {score}) has no match"
      used[np.argmax(match)] = True
      same_order += int(np.argmax(match) == row)
  print("valid detections per image:", reference["valid"].sum(axis=1), "rows in the same order:",
        same_order)


def test_stablehlo_with_symbolic_batch_in_a_fresh_process(model_dir, reference, tmp_path):
  images, image_hw = photos()
  out = tmp_path / "hlo"
  spec = export.ExportSpec(image_size=CANVAS, max_detections=50)
  export.export_model(checkpoints.load_model(model_dir), str(out), fmt="stablehlo", spec=spec)
  assert sorted(os.listdir(out)) == ["description.json", "labels.json", "model.stablehlo",
                                     "signature.json"]
  with open(out / "labels.json") as f:
    assert json.load(f)[3] == {"class": 3, "category_id": 5, "name": "mug"}
  with open(out / "signature.json") as f:
    signature = json.load(f)
  assert signature["inputs"]["images"] == {"dtype": "uint8", "shape": ["B", 192, 256, 3]}
  with open(out / "description.json") as f:
    assert json.load(f)["label_map"]["names"] == list(NAMES)

  ours = run_fresh("stablehlo", out, images[:2], image_hw[:2], tmp_path)  # any batch: 2 here
  assert json.loads(str(ours["project_modules"])) == []
  assert_same_detections(ours, {k: v[:2] for k, v in reference.items()})
  assert str(ours["error_dtype"]) == "Dtype mismatch for args[0]: expected uint8 and called with float32"
  assert "Rank mismatch for args[0]: expected (b, 192, 256, 3)" in str(ours["error_rank"])
  assert "expected (b, 192, 256, 3) and called with (2, 191, 256, 3)" in str(ours["error_size"])
  with pytest.raises(FileExistsError, match="not an empty directory"):
    export.export_model(checkpoints.load_model(model_dir), str(out), fmt="stablehlo", spec=spec)


def test_savedmodel_in_a_fresh_tensorflow_process(model_dir, reference, tmp_path):
  images, image_hw = photos()
  out = tmp_path / "tf"
  loaded = checkpoints.load_model(model_dir)
  with pytest.raises(ValueError, match="a SavedModel needs a fixed batch size"):
    export.export_model(loaded, str(out), fmt="savedmodel", spec=export.ExportSpec(image_size=CANVAS))
  spec = export.ExportSpec(image_size=CANVAS, batch_size=3, max_detections=50)
  export.export_model(loaded, str(out), fmt="savedmodel", spec=spec)
  assert os.path.isfile(out / "saved_model" / "saved_model.pb") and os.path.isfile(out / "labels.json")

  ours = run_fresh("savedmodel", out, images, image_hw, tmp_path)
  assert json.loads(str(ours["project_modules"])) == []
  assert_same_detections(ours, reference)
  assert "expected to be a uint8 tensor but is a float tensor" in str(ours["error_dtype"])
  for case in ("rank", "size"):
    assert "is not compatible with expected shape [3,192,256,3]" in str(ours[f"error_{case}"])


def test_bfloat16_stablehlo_matches_the_in_process_bfloat16_model(model_dir):
  """bfloat16 network, float32 decoding and NMS: the artifact gives the in-process bfloat16 model's
  detections within 1e-3 px / 1e-5 (measured: identical). Against the float32 model the ranking
  differs (bfloat16 rounds the logits), so rows are not comparable one to one."""
  images, image_hw = photos()
  loaded = checkpoints.load_model(model_dir, dtype="bfloat16")
  spec = export.ExportSpec(image_size=CANVAS, max_detections=50)
  exported = jax.export.deserialize(export.export_stablehlo(loaded, spec=spec).serialize())
  ours = {k: np.asarray(v) for k, v in exported.call(images, image_hw).items()}
  assert_same_detections(ours, in_process(model_dir, images, image_hw, max_detections=50,
                                          dtype="bfloat16"))


def test_onnx_from_the_command_in_a_fresh_onnxruntime_process(model_dir, reference, tmp_path):
  """scripts/export.py --format=onnx (jax2onnx network and candidates, ONNX NonMaxSuppression), run
  by onnxruntime alone."""
  images, image_hw = photos()
  out = tmp_path / "onnx"
  loaded = checkpoints.load_model(model_dir)
  with pytest.raises(ValueError, match="an ONNX model needs a fixed batch size"):
    export.export_model(loaded, str(out), fmt="onnx", spec=export.ExportSpec(image_size=CANVAS))
  with pytest.raises(ValueError, match="the ONNX export is float32 only"):
    export.export_model(loaded, str(out), fmt="onnx", dtype="bfloat16",
                        spec=export.ExportSpec(image_size=CANVAS, batch_size=3))
  assert not out.exists()  # refused before anything is written
  done = subprocess.run([sys.executable, EXPORT_SCRIPT, f"--checkpoint={model_dir}", "--format=onnx",
                         f"--output={out}", "--image_size=192,256", "--batch_size=3",
                         "--max_detections=50"], capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == f"wrote {out} (onnx, input uint8 [3, 192, 256, 3])"
  assert sorted(os.listdir(out)) == ["description.json", "labels.json", "model.onnx",
                                     "signature.json"]
  with open(out / "signature.json") as f:
    signature = json.load(f)
  assert (signature["format"], signature["inputs"]["image_hw"]) == (
      "onnx", {"dtype": "int32", "shape": [3, 2]})
  assert signature["nms"].startswith("ONNX NonMaxSuppression")

  ours = run_fresh("onnx", out, images, image_hw, tmp_path)
  assert json.loads(str(ours["project_modules"])) == []
  assert_same_detection_sets(ours, reference)
  assert str(ours["error_dtype"]).endswith(
      "Unexpected input data type. Actual: (tensor(float)) , expected: (tensor(uint8))")
  assert "Invalid rank for input: images Got: 3 Expected: 4" in str(ours["error_rank"])
  assert ("Got invalid dimensions for input: images for the following indices\n index: 1 Got: 191 "
          "Expected: 192") in str(ours["error_size"])


def test_side_files_say_how_to_resize_for_each_geometry(tmp_path):
  """signature.json's input_resize: 'fixed' (stretch to S x S, boxes back per axis), a training
  run's 'resize' and converted weights' (torchvision's 800/1333); the default canvas; a canvas too
  small for a fixed model's square is refused before anything is written."""
  base = ModelDescription(kind="retinanet", model=retinanet.RetinaNetConfig(num_classes=5),
                          anchors=anchor_lib.AnchorConfig(), input_convention="torchvision",
                          label_map=LabelMap((1, 2, 3, 5, 8), NAMES))
  fixed = dataclasses.replace(base, geometry=Geometry(96, 96, 32, mode="fixed", image_size=96))
  trained = dataclasses.replace(base, geometry=Geometry(640, 1000, 128))
  expected = {
      "fixed": (fixed, (96, 96), {"mode": "fixed", "image_size": [96, 96]},
                ["stretch every photo to 96 x 96", "image_hw = [96, 96]"],
                "per axis: sx = 96 / w, sy = 96 / h; x1 / sx, y1 / sy, x2 / sx, y2 / sy"),
      "trained": (trained, (800, 1344), {"mode": "resize", "min_size": 640, "max_size": 1000},
                  ["s = min(640 / min(h, w), 1000 / max(h, w))", "(floor(h * s), floor(w * s))"],
                  "divide x by sx = resized width / w and y by sy = resized height / h"),
      "converted": (base, (800, 1344), {"mode": "resize", "min_size": 800, "max_size": 1333},
                    ["s = min(800 / min(h, w), 1333 / max(h, w))"], "divide x by sx"),
  }
  for name, (description, canvas, fields, resize, back) in expected.items():
    assert export.default_image_size(description) == canvas, name
    spec = export.ExportSpec(image_size=canvas, batch_size=1)
    export.check_request(str(tmp_path / name), fmt="stablehlo", spec=spec, description=description)
    os.makedirs(tmp_path / name)
    export.write_side_files(str(tmp_path / name), description, spec=spec, fmt="stablehlo",
                            dtype="float32")
    with open(tmp_path / name / "signature.json") as f:
      written = json.load(f)["input_resize"]
    assert {k: written[k] for k in fields} == fields, name
    assert all(part in written["resize"] for part in resize), (name, written)
    assert written["boxes_to_photo"].startswith(back), (name, written)
  assert "torchvision's defaults" in export.input_resize(base)["from"]
  with pytest.raises(ValueError, match=r"stretches every image to 96 x 96 \(geometry mode 'fixed'\), "
                                       r"which a canvas of 64 x 128 cannot hold; give "
                                       r"--image_size=96,96"):
    export.check_request(str(tmp_path / "small"), fmt="stablehlo", description=fixed,
                         spec=export.ExportSpec(image_size=(64, 128)))
  assert not (tmp_path / "small").exists()


def test_the_command_exports_a_fixed_model_at_its_square(model_dir, tmp_path):
  """scripts/export.py without --image_size on a model described as 'fixed' (96): a 96 x 96 canvas,
  and the console line says to stretch."""
  state, description = checkpoints.read_model_state(model_dir)
  fixed_dir = str(tmp_path / "fixed_model")
  checkpoints.save_model(fixed_dir, state, dataclasses.replace(
      description, geometry=Geometry(96, 96, 32, mode="fixed", image_size=96)))
  out = tmp_path / "hlo"
  done = subprocess.run([sys.executable, EXPORT_SCRIPT, f"--checkpoint={fixed_dir}",
                         "--format=stablehlo", f"--output={out}"], capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == (f"wrote {out} (stablehlo, input uint8 ['B', 96, 96, 3]; stretch "
                                 f"each photo to 96 x 96, boxes back per axis (signature.json))")
  with open(out / "signature.json") as f:
    signature = json.load(f)
  assert signature["inputs"]["images"]["shape"] == ["B", 96, 96, 3]
  assert signature["input_resize"]["mode"] == "fixed"
  with open(out / "model.stablehlo", "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert exported.in_avals[0].shape[1:] == (96, 96, 3)
