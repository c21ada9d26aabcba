"""The CPU default: the built-in synthetic dataset, a small RetinaNet trained from scratch.

    python scripts/train.py --config=configs/synthetic.py --workdir=runs/synthetic

Same code path as COCO (TFDS dataset, tf.data pipeline, sharded train step, pycocotools evaluation);
only sizes change: 128x128 images, a ResNet-18 trained from scratch (no pretrained weights can be
downloaded here) with batch norm on batch statistics ('sync_bn': global over devices; cheaper than
GroupNorm on the CPU), 64-channel FPN and GroupNorm heads, anchors of 16-256 px (anchor_scale 2) to
fit 8-96 px objects, GIoU box loss, AdamW with warm-up and cosine decay, 800 steps of 16 images.

The input sizes follow the dataset's: `--config.data.synthetic.image_size=64` alone also sets the
five sizes derived from it (`config.derive_fields`, at the typed-config boundary).

Variant `smoke` (`--config=configs/synthetic.py:smoke`): 3 steps on a small synthetic dataset of its
own (64 training and 16 validation images, built in a second), evaluated on its whole validation
split, so that `--config.data.synthetic.num_validation=8` (or any other knob) composes with it.
"""

from retinanet_jax import config as config_lib
from retinanet_jax.data import config as data_config_lib

VARIANTS = ("", "smoke")


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.data = data_config_lib.synthetic_data_config()
  c.model.backbone = "resnet18"
  c.model.norm = "sync_bn"
  c.model.freeze_at = 0
  c.model.fpn_channels = 64
  c.model.head_num_convs = 2
  c.model.head_norm = "group_norm"
  c.model.num_classes = c.data.synthetic.num_classes
  c.anchors.anchor_scale = 2.0
  c.anchors.convention = "tf"
  c.loss.box_loss = "giou"
  c.train.batch_size = 16
  c.train.steps = 800
  c.train.optimizer = "adamw"
  c.train.base_lr = 2e-3
  c.train.weight_decay = 1e-4
  c.train.schedule = "cosine"
  c.train.warmup_steps = 100
  c.train.warmup_factor = 0.01
  c.train.grad_clip_norm = 10.0
  c.train.log_every = 50
  c.train.checkpoint_every = 400
  c.eval.batch_size = 16
  c.eval.num_images_png = 8
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; expected one of {VARIANTS}")
  if arg == "smoke":
    c.train.steps = 3
    c.train.warmup_steps = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.data.synthetic.num_train = 64
    c.data.synthetic.num_validation = 16
    c.eval.num_images_png = 2
  return c
