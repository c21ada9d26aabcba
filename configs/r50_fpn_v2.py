"""torchvision's `retinanet_resnet50_fpn_v2` recipe: GroupNorm heads, P6 from C5, GIoU box loss,
AdamW, multi-scale training with short sides 480-800 (torchvision trained it for 26 epochs,
about 195k steps at batch 16)."""

from retinanet_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.model.head_norm = "group_norm"
  c.model.p6_input = "c5"
  c.loss.box_loss = "giou"
  c.train.optimizer = "adamw"
  c.train.base_lr = 1e-4
  c.train.weight_decay = 0.05
  c.train.steps = 195_000
  c.train.decay_steps = (120_000, 165_000)
  c.data.train_min_size_range = (480, 800)
  return config_lib.apply_variant(c, arg)
