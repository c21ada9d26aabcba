"""Dense scenes on the CPU: the built-in synthetic data in its dense layout, ~150 small touching
objects per image (SKU-110K's average), counted as well as detected.

    python scripts/train.py --config=configs/dense_synthetic.py --workdir=runs/dense_synthetic

The model and optimizer of configs/synthetic.py; what changes for density:
  * data: 192x192 images filled with shelves of 10-19 px objects packed side by side (gaps of 0-1
    px), 2000 training and 100 validation images; `max_boxes` 400 (the densest image has 176);
  * anchors: `anchor_scale` 1.5 (12, 15 and 19 px on P3), the size of the objects;
  * evaluation: up to 400 detections per image (`max_detections`; COCO's 100 would cap recall at
    100 of ~150 objects), AP with up to 300 detections per image (`max_dets` (1, 10, 100, 300):
    AP@300, SKU-110K's protocol), 1000 candidates per level, and counting
    (`eval.count_score_threshold` None: chosen on the validation split, evaluation/counting.py).
"""

import os

from retinanet_jax import config as config_lib

VARIANTS = ("", "smoke")


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; expected one of {VARIANTS}")
  base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic.py")
  c = config_lib.load_config_file(f"{base}:{arg}" if arg else base)
  s = c.data.synthetic
  s.layout = "dense"
  s.image_size = 192
  s.min_object_size = 10.0
  s.max_object_fraction = 0.1
  s.max_objects = 400
  s.dense_gap = 1.0
  s.num_train = 2000
  s.num_validation = 100
  c.data.train_min_size_range = (192, 192)
  c.data.eval_min_size = 192
  c.data.max_size = 192
  c.data.image_size = 192
  c.data.pad_multiple = 64
  c.data.max_boxes = 400
  c.anchors.anchor_scale = 1.5
  c.eval.max_detections = 400
  c.eval.max_dets = (1, 10, 100, 300)
  c.eval.topk_candidates = 1000
  c.eval.batch_size = 10
  c.eval.num_images_png = 4
  c.train.steps = 600
  c.train.checkpoint_every = 300
  if arg == "smoke":
    c.train.steps = 3
    c.train.checkpoint_every = 3
    c.data.eval_split = "validation[:10]"
  return c
