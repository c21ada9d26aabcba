"""torchvision's `retinanet_resnet50_fpn_v2` recipe: GroupNorm heads, P6 from C5, GIoU box loss,
AdamW, multi-scale training with short sides 480-800 (torchvision trained it for 26 epochs,
about 195k steps at batch 16)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import r50_fpn  # noqa: E402


def get_config(arg: str | None = None):
  c = r50_fpn.get_config()
  c.model.head_norm = "group_norm"
  c.model.p6_input = "c5"
  c.loss.box_loss = "giou"
  c.train.optimizer = "adamw"
  c.train.base_lr = 1e-4
  c.train.weight_decay = 0.05
  c.train.steps = 195_000
  c.train.decay_steps = (120_000, 165_000)
  c.data.train_min_size_range = (480, 800)
  return r50_fpn.apply_variant(c, arg)
