"""RetinaNet X-101-32x8d-FPN (ResNeXt), 1x schedule. The stride sits in the 3x3 convolution, as in
torchvision's and detectron2's ResNeXt weights."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import r50_fpn  # noqa: E402


def get_config(arg: str | None = None):
  c = r50_fpn.get_config()
  c.model.backbone = "resnext101_32x8d"
  return r50_fpn.apply_variant(c, arg)
