"""RetinaNet R-101-FPN, 1x schedule (detectron2's retinanet_R_101_FPN_3x uses 3x: set
--config.train.steps=270000 --config.train.decay_steps='(210000,250000)')."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import r50_fpn  # noqa: E402


def get_config(arg: str | None = None):
  c = r50_fpn.get_config()
  c.model.backbone = "resnet101"
  return r50_fpn.apply_variant(c, arg)
