"""scripts/detect.py: a converted torchvision checkpoint, image files of arbitrary sizes; the JSON must
agree with torchvision's model(images) on the same weights, and the command must never overwrite a
file (inputs, earlier outputs), keep duplicate names apart, give unique ids and a quiet console. A
model whose description says 'fixed' (data.mode='fixed') gets its images stretched and its boxes
mapped back per axis, against float64 NumPy."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNet as TorchRetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinanet_jax import checkpoints
from retinanet_jax.inference import visualization
from retinanet_jax.checkpoints import weights
from retinanet_jax.checkpoints.model_description import Geometry
from retinanet_jax.models import preprocessing, retinanet
from scripts import detect as detect_script  # one module object: its absl flags are defined once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECT = os.path.join(REPO, "scripts", "detect.py")
MIN_SIZE, MAX_SIZE = 96, 160
SIZES = dict(min_size=MIN_SIZE, max_size=MAX_SIZE)
FIXED = 96  # the side of the 'fixed' model's square



def small_torchvision_retinanet(images):
  """RetinaNet v1 layout on a ResNet-18, random weights scaled so that scores spread out."""
  torch.manual_seed(0)
  backbone = _resnet_fpn_extractor(torchvision.models.resnet18(), 5, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
  model = TorchRetinaNet(backbone, num_classes=91, min_size=MIN_SIZE, max_size=MAX_SIZE).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
    for module in model.head.modules():
      if isinstance(module, torch.nn.Conv2d):
        module.weight.normal_(0.0, (2.0 / (9 * module.in_channels)) ** 0.5)
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    for subnet, conv, std in ((model.head.classification_head, "cls_logits", 1.0),
                              (model.head.regression_head, "bbox_reg", 0.2)):
      predictor = getattr(subnet, conv)
      out = torch.cat([predictor(subnet.conv(f)).flatten() for f in features])
      predictor.weight.mul_(std / out.std())
      predictor.bias.zero_()
    model.head.classification_head.cls_logits.bias.uniform_(-7.0, -6.0)
  return model


def _originals():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (71, 103, 3), dtype=np.uint8),
          rng.integers(0, 256, (130, 57, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """`(checkpoint dir, torchvision reference model)`, converted once for this module."""
  tmp = tmp_path_factory.mktemp("detect_ckpt")
  tensors = [torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in _originals()]
  reference = small_torchvision_retinanet(tensors)
  torch.save(reference.state_dict(), tmp / "r18.pth")
  weights.convert(str(tmp / "r18.pth"), str(tmp / "ckpt"), source="torchvision_v1",
                  backbone="resnet18", norm_epsilon=1e-5)
  return str(tmp / "ckpt"), reference


def _write(folder, name, image):
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(image).save(os.path.join(folder, name))
  return os.path.join(folder, name)


def _digests(folder):
  return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
          for n in sorted(os.listdir(folder))}


def test_detect_files_matches_torchvision(converted, tmp_path):
  checkpoint, reference = converted
  originals = _originals()
  paths = [_write(tmp_path, "000000000042.png", originals[0]), _write(tmp_path, "tall.png", originals[1])]
  with torch.no_grad():  # one at a time, as the script runs them
    expected = [reference([torch.from_numpy(i).permute(2, 0, 1).float() / 255])[0] for i in originals]

  out = tmp_path / "out"
  results = detect_script.detect_files(paths, checkpoint=checkpoint, output=str(out), **SIZES,
                                       draw_threshold=0.1, max_detections=300,
                                       count_threshold=0.2)

  # The count: each image's detections scoring >= count_threshold (the torchvision model's own
  # detections, below, are checked against these results).
  counts = [sum(r["score"] >= 0.2 for r in results if r["image_id"] == i) for i in (0, 1)]
  assert 0 < counts[0] < sum(r["image_id"] == 0 for r in results)
  with open(out / "images.json") as f:  # not all names are numbers: ids are positions
    assert json.load(f) == [
        {"id": 0, "file_name": "000000000042.png", "path": paths[0],
         "output_file": "000000000042.detections.png", "height": 71, "width": 103,
         "count": counts[0], "count_threshold": 0.2},
        {"id": 1, "file_name": "tall.png", "path": paths[1], "output_file": "tall.detections.png",
         "height": 130, "width": 57, "count": counts[1], "count_threshold": 0.2}]
  for name, image in zip(("000000000042.detections.png", "tall.detections.png"), originals):
    with Image.open(out / name) as picture:
      assert picture.size == (image.shape[1], image.shape[0])
  with open(out / "detections.json") as f:
    assert json.load(f) == results
  assert set(results[0]) == {"image_id", "category_id", "category_name", "bbox", "score", "file_name"}
  for r in results:  # 91 classes kept: category id = label, names are torchvision's
    assert r["category_name"] == weights.COCO_91_NAMES[r["category_id"]]
    assert r["file_name"] == paths[r["image_id"]]
  for image_id, ref in enumerate(expected):
    ours = [r for r in results if r["image_id"] == image_id]
    assert 5 < len(ref["scores"]) == len(ours) < 300
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in ours)])
    scores = np.array([r["score"] for r in ours])
    classes = np.array([r["category_id"] for r in ours])
    used = np.zeros(len(ours), bool)
    for box, score, label in zip(ref["boxes"].numpy(), ref["scores"].numpy(), ref["labels"].numpy()):
      ok = ((~used) & (classes == label) & (np.abs(boxes - box).max(axis=1) < 0.05)
            & (np.abs(scores - score) < 1e-4))
      assert ok.any(), (image_id, box, score, label)
      used[np.argmax(ok)] = True


def test_output_in_the_input_folder_never_overwrites(converted, tmp_path):
  checkpoint, _ = converted
  photos = tmp_path / "photos"
  image = _originals()[0]
  paths = [_write(photos, "cat.png", image), _write(photos, "0.png", image[::-1])]
  before = _digests(photos)
  detect_script.detect_files(paths, checkpoint=checkpoint, output=str(photos), **SIZES)
  after = _digests(photos)
  assert {n: after[n] for n in before} == before  # every input byte-identical
  assert set(after) - set(before) == {"cat.detections.png", "0.detections.png", "detections.json",
                                      "images.json"}
  # A second run into the same folder would overwrite the first one's outputs: refused, unchanged.
  with pytest.raises(FileExistsError, match=r"cat\.detections\.png.*nothing was written"):
    detect_script.detect_files(paths, checkpoint=checkpoint, output=str(photos), **SIZES)
  assert _digests(photos) == after
  # A user's file that has an output's name is never written over either.
  more = tmp_path / "more"
  paths = [_write(more, "dog.png", image), _write(more, "dog.detections.png", image)]
  before = _digests(more)
  with pytest.raises(FileExistsError, match=r"holds 1 file.*more/dog\.detections\.png;"):
    detect_script.detect_files(paths[:1], checkpoint=checkpoint, output=str(more), **SIZES)
  assert _digests(more) == before


def test_duplicate_names_and_unique_ids(converted, tmp_path):
  checkpoint, _ = converted
  image = _originals()[1]
  paths = [_write(tmp_path / "a", "7.png", image), _write(tmp_path / "b", "7.png", image[:, ::-1]),
           _write(tmp_path / "b", "007.jpg", image[::-1])]
  out = tmp_path / "out"
  detect_script.detect_files(paths, checkpoint=checkpoint, output=str(out), **SIZES)
  with open(out / "images.json") as f:
    images = json.load(f)
  # 7, 7 and 007 are the same number: positions instead, so the ids stay unique.
  assert [(i["id"], i["path"], i["output_file"]) for i in images] == [
      (0, paths[0], "7.detections.png"), (1, paths[1], "7-2.detections.png"),
      (2, paths[2], "007.detections.png")]
  with Image.open(out / "7.detections.png") as p1, Image.open(out / "7-2.detections.png") as p2:
    assert not np.array_equal(np.asarray(p1), np.asarray(p2))  # two different pictures


def test_image_ids_and_output_names():
  assert detect_script.image_ids(["a/000000397133.jpg", "b/42.png"]) == [397133, 42]
  assert detect_script.image_ids(["cat.png", "0.png"]) == [0, 1]  # both 0 before
  assert detect_script.image_ids(["x/1.png", "y/1.jpg"]) == [0, 1]
  assert detect_script.output_names(["a/cat.png", "b/cat.jpg", "cat-2.png", "c/cat.png"]) == [
      "cat.detections.png", "cat-2.detections.png", "cat-2-2.detections.png", "cat-3.detections.png"]


def test_console_is_quiet_unless_verbose(converted, tmp_path):
  checkpoint, _ = converted
  path = _write(tmp_path, "photo.png", _originals()[0])

  def run(*flags):
    command = [sys.executable, DETECT, f"--checkpoint={checkpoint}", f"--min_size={MIN_SIZE}",
               f"--max_size={MAX_SIZE}", *flags, path]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr

  quiet = run(f"--output={tmp_path / 'quiet'}")
  expected = f"{path}: 100 detections, 0 drawn, count 0 -> photo.detections.png"
  assert quiet.splitlines() == [expected], quiet
  loud = run(f"--output={tmp_path / 'loud'}", "--verbose")  # Orbax's and the backends' INFO lines
  assert "orbax-checkpoint version" in loud and len(loud.splitlines()) > 2, loud


@pytest.fixture(scope="module")
def fixed_model(converted, tmp_path_factory):
  """The converted weights saved again with a description whose geometry is 'fixed' (every image
  stretched to FIXED x FIXED, as a configs/sardet_r50.py run describes itself)."""
  checkpoint, _ = converted
  state, description = checkpoints.read_model_state(checkpoint)
  assert description.geometry is None  # converted weights: 'resize' with torchvision's sizes
  geometry = Geometry(min_size=FIXED, max_size=FIXED, pad_multiple=32, mode="fixed",
                      image_size=FIXED)
  path = str(tmp_path_factory.mktemp("fixed_ckpt") / "ckpt")
  checkpoints.save_model(path, state, dataclasses.replace(description, geometry=geometry))
  return path


def test_a_fixed_model_stretches_and_maps_boxes_back_per_axis(fixed_model, tmp_path):
  """The network must see each photo stretched to FIXED x FIXED (torch's bilinear resize; the
  default min_size/max_size of detect_files, 800/1333, must not apply), and each box in the stretched
  frame must come back as x * w0 / FIXED, y * h0 / FIXED (float64), drawn on the original photo."""
  originals = _originals()  # 71 x 103 (wide) and 130 x 57 (tall): each axis its own factor
  paths = [_write(tmp_path, "wide.png", originals[0]), _write(tmp_path, "tall.png", originals[1])]
  out = tmp_path / "out"
  results = detect_script.detect_files(paths, checkpoint=fixed_model, output=str(out),
                                       draw_threshold=0.1, max_detections=300,
                                       count_threshold=0.2)
  loaded = checkpoints.load_model(fixed_model)
  for image_id, original in enumerate(originals):
    h0, w0 = original.shape[:2]
    stretched = preprocessing.resize_bilinear(original, (FIXED, FIXED))
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(original).permute(2, 0, 1)[None].float(), size=(FIXED, FIXED),
        mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(stretched, reference, rtol=0, atol=1e-3)
    net = retinanet.detect(loaded.module(), stretched[None], np.array([[FIXED, FIXED]], np.int32),
                           np.ones((1, 2), np.float32), anchor_config=loaded.description.anchors,
                           convention=loaded.description.input_convention, max_detections=300)
    valid = np.asarray(net.valid[0])
    n = np.asarray(net.boxes[0])[valid].astype(np.float64)  # [x1, y1, x2, y2] in the square
    x1, y1, x2, y2 = n[:, 0] * w0 / FIXED, n[:, 1] * h0 / FIXED, n[:, 2] * w0 / FIXED, n[:, 3] * h0 / FIXED
    ours = [r for r in results if r["image_id"] == image_id]
    assert 5 < len(ours) == valid.sum() < 300
    np.testing.assert_allclose([r["bbox"] for r in ours],
                               np.stack([x1, y1, x2 - x1, y2 - y1], axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal([r["score"] for r in ours], np.asarray(net.scores[0])[valid])
    assert max(r["bbox"][0] + r["bbox"][2] for r in ours) <= w0  # clipped to the photo
    assert max(r["bbox"][1] + r["bbox"][3] for r in ours) <= h0
    # The picture is the original photo with the mapped boxes (those scoring >= 0.1) drawn on it.
    shown = np.asarray(net.scores[0])[valid] >= 0.1
    assert 0 < shown.sum()
    expected = visualization.draw_detections(
        original, np.stack([x1, y1, x2, y2], axis=1)[shown], np.asarray(net.classes[0])[valid][shown],
        np.asarray(net.scores[0])[valid][shown], names=loaded.description.label_map.names)
    count = int((np.asarray(net.scores[0])[valid] >= 0.2).sum())  # and the object count on it
    visualization.draw_caption(expected, f"count: {count} (score >= 0.2)")
    with open(out / "images.json") as f:
      assert [i["count"] for i in json.load(f) if i["id"] == image_id] == [count]
    with Image.open(out / f"{('wide', 'tall')[image_id]}.detections.png") as picture:
      assert picture.size == (w0, h0)
      np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), np.asarray(expected))


def test_the_command_stretches_for_a_fixed_model_and_refuses_resize_flags(fixed_model, tmp_path):
  """scripts/detect.py on the 'fixed' model: the description's geometry is the default (the same
  detections as detect_files); --min_size is an aspect-preserving setting: refused (exit code 2)."""
  path = _write(tmp_path, "photo.png", _originals()[1])
  expected = detect_script.detect_files([path], checkpoint=fixed_model, output=str(tmp_path / "lib"))

  def run(*flags):
    return subprocess.run([sys.executable, DETECT, f"--checkpoint={fixed_model}", *flags, path],
                          capture_output=True, text=True, timeout=300, check=False)

  done = run(f"--output={tmp_path / 'cmd'}")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / "cmd" / "detections.json") as f:
    assert json.load(f) == expected
  done = run(f"--output={tmp_path / 'refused'}", "--min_size=800")
  assert done.returncode == 2, done.stderr[-3000:]
  message = " ".join(done.stderr.split())  # the console wraps long lines
  assert (f"was trained with every image stretched to {FIXED} x {FIXED} (geometry mode 'fixed')"
          in message and "--min_size (the aspect-preserving resize) do not apply" in message), message
  assert not os.path.exists(tmp_path / "refused")
