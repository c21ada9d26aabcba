"""RetinaNet R-50-FPN on SARDet-100K (SAR object detection, 6 classes): the benchmark's recipe.

    python scripts/prepare_dataset.py --name=sardet100k \
        --annotations train=SARDet-100K/Annotations/train.json --images train=SARDet-100K/JPEGImages/train \
        --annotations validation=SARDet-100K/Annotations/val.json --images validation=SARDet-100K/JPEGImages/val
    python scripts/train.py --config=configs/sardet_r50.py --workdir=runs/sardet \
        --config.init_from=weights/r50_imagenet

SARDet-100K's RetinaNet baseline (its mmdetection config `retinanet_r50_fpn` with `schedule_1x`):
every image resized to 800x800 without keeping its aspect ratio (`Resize(scale=(800, 800),
keep_ratio=False)`; our `data.mode='fixed'`, mapped back per axis for evaluation), horizontal flips
with probability 0.5, AdamW (lr 1e-4, weight decay 0.05, betas 0.9 / 0.999) at batch 16, and the 1x
schedule: 12 epochs, the learning rate divided by 10 after epochs 8 and 11, 500 linear warm-up
iterations from 0.001x. Epochs are converted to steps with `TRAIN_IMAGES`, the size of SARDet-100K's
train split as its paper reports it; if yours differs (filtered images), change it.
The rest is the paper's RetinaNet (this project's defaults); mmdetection's RetinaNet regresses with an
L1 loss, our default is detectron2's smooth L1 (beta 0.1); `--config.loss.box_loss=l1` for
mmdetection's. Evaluation: COCO AP with AP per class (the table prints all 6).
"""

import math

from retinanet_jax import config as config_lib

TRAIN_IMAGES = 94_493  # SARDet-100K train split
NUM_CLASSES = 6  # ship, aircraft, car, tank, bridge, harbor
BATCH_SIZE = 16
EPOCHS, DECAY_EPOCHS = 12, (8, 11)


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.model.num_classes = NUM_CLASSES
  c.data.name = "sardet100k"
  c.data.mode = "fixed"
  c.data.image_size = 800
  c.data.pad_multiple = 32  # 800 is a multiple of 32: no padding
  c.train.optimizer = "adamw"
  c.train.base_lr = 1e-4  # per 16 images
  c.train.weight_decay = 0.05
  c.train.batch_size = BATCH_SIZE
  steps_per_epoch = TRAIN_IMAGES / BATCH_SIZE
  c.train.steps = math.ceil(EPOCHS * steps_per_epoch)
  c.train.decay_steps = tuple(math.ceil(e * steps_per_epoch) for e in DECAY_EPOCHS)
  c.train.warmup_steps = 500
  c.train.warmup_factor = 0.001
  c = config_lib.apply_variant(c, arg)
  if arg == "smoke":
    c.data.image_size = 128
  return c
