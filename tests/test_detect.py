"""scripts/detect.py end to end: a converted torchvision checkpoint, two image files of arbitrary
sizes, the command line; the JSON must agree with torchvision's model(images) on the same weights."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNet as TorchRetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinanet_jax import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_SIZE, MAX_SIZE = 96, 160


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


def test_detect_script_matches_torchvision(tmp_path):
  rng = np.random.default_rng(0)
  originals = [rng.integers(0, 256, (71, 103, 3), dtype=np.uint8),
               rng.integers(0, 256, (130, 57, 3), dtype=np.uint8)]
  paths = [str(tmp_path / "000000000042.png"), str(tmp_path / "tall.png")]
  for image, path in zip(originals, paths):
    Image.fromarray(image).save(path)
  tensors = [torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in originals]
  reference = small_torchvision_retinanet(tensors)
  torch.save(reference.state_dict(), tmp_path / "r18.pth")
  weights.convert(str(tmp_path / "r18.pth"), str(tmp_path / "ckpt"), source="torchvision_v1",
                  backbone="resnet18", norm_epsilon=1e-5)
  with torch.no_grad():
    expected = [reference([t])[0] for t in tensors]  # one at a time, as the script runs them

  out = tmp_path / "out"
  command = [sys.executable, os.path.join(REPO, "scripts", "detect.py"),
             f"--checkpoint={tmp_path / 'ckpt'}", f"--output={out}", f"--min_size={MIN_SIZE}",
             f"--max_size={MAX_SIZE}", "--draw_threshold=0.1", "--max_detections=300", *paths]
  run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]

  with open(out / "images.json") as f:
    assert json.load(f) == [{"id": 42, "file_name": "000000000042.png", "height": 71, "width": 103},
                            {"id": 1, "file_name": "tall.png", "height": 130, "width": 57}]
  for name, image in zip(("000000000042.png", "tall.png"), originals):
    with Image.open(out / name) as picture:
      assert picture.size == (image.shape[1], image.shape[0])
  with open(out / "detections.json") as f:
    results = json.load(f)
  assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
  for image_id, ref in zip((42, 1), expected):
    ours = [r for r in results if r["image_id"] == image_id]
    assert 5 < len(ref["scores"]) == len(ours) < 300
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in ours)])
    scores = np.array([r["score"] for r in ours])
    classes = np.array([r["category_id"] for r in ours])  # 91 classes kept: category id = label
    used = np.zeros(len(ours), bool)
    for box, score, label in zip(ref["boxes"].numpy(), ref["scores"].numpy(), ref["labels"].numpy()):
      ok = ((~used) & (classes == label) & (np.abs(boxes - box).max(axis=1) < 0.05)
            & (np.abs(scores - score) < 1e-4))
      assert ok.any(), (image_id, box, score, label)
      used[np.argmax(ok)] = True
