"""A config for subprocess tests of scripts/train.py: the synthetic config shrunk to seconds per run.

    python scripts/train.py --config=tests/helpers/tiny_config.py --workdir=W \
        --config.data.data_dir=D --config.train.steps=20

The same sizes as `tiny_synthetic` in tests/test_train.py: 64x64 images, ResNet-18 (frozen) with
32-channel FPN and one head convolution, 96 training and 16 validation images, a global batch of 8,
20 steps, a checkpoint every 5; smooth L1 box loss (see below).
"""

import os

from retinanet_jax import config as config_lib

SYNTHETIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs",
                         "synthetic.py")

SIZE = 64


def get_config(arg: str | None = None):
  del arg
  c = config_lib.load_config_file(SYNTHETIC)
  c.model.backbone = "resnet18"
  c.model.fpn_channels = 32
  c.model.head_num_convs = 1
  # Backbone frozen: these runs test the loop (hosts, checkpoints, resume), not learning; a frozen
  # backbone compiles ~3x faster and steps ~3x faster on CPU. FPN and heads still train (AdamW).
  c.model.freeze_at = 5
  c.model.norm = "group_norm"  # pinned: a frozen sync_bn would become an identity frozen_bn
  # Smooth L1 (the paper's box loss) instead of the synthetic config's GIoU. GIoU's gradient jumps
  # where a predicted box edge crosses its ground-truth edge, so float rounding that differs between
  # 1 and 2 processes (another summation order) grows under AdamW: with GIoU the losses of
  # tests/test_multihost.py were 5.2e-4 apart after 20 steps; with smooth L1, 1.2e-7.
  c.loss.box_loss = "smooth_l1"
  s = c.data.synthetic
  s.image_size, s.num_train, s.num_validation, s.max_objects = SIZE, 96, 16, 3
  s.min_object_size, s.max_object_fraction = 12.0, 0.8
  c.data.train_min_size_range = (SIZE, SIZE)
  c.data.eval_min_size = c.data.max_size = c.data.image_size = SIZE
  c.data.pad_multiple = 64
  c.data.max_boxes = 8
  c.data.shuffle_buffer = 32
  c.data.num_parallel_calls = 1
  c.data.prefetch = 1
  c.train.batch_size = 8
  c.train.steps = 20
  c.train.warmup_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 5
  c.train.keep_checkpoints = 2
  c.eval.batch_size = 8
  c.eval.num_images_png = 0
  return c
