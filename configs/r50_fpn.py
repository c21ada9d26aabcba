"""RetinaNet R-50-FPN on COCO 2017: the paper's and detectron2's "1x" schedule. The base config.

    python scripts/train.py --config=configs/r50_fpn.py --workdir=runs/r50
    python scripts/train.py --config=configs/r50_fpn.py:smoke --workdir=/tmp/smoke  # a few tiny steps
    python scripts/train.py --config=configs/r50_fpn.py --config.train.batch_size=8  # leaf override

The values are `retinanet_jax.config.Config`'s defaults, which are the paper's: every field is
documented there with which reference implementation uses which value (docs/configs.md's table), and checked
when the run starts. In short: frozen-BN ResNet-50 (stem + res2 frozen), FPN P3-P7 with P6 from C5,
4-convolution heads, 9 anchors per location (torchvision's sizes), IoU 0.5 / 0.4 matching with ties,
focal loss alpha 0.25 / gamma 2, smooth L1 (beta 0.1) on the box deltas, normalized by the positive
anchors of the global batch; 800/1333 input with flips; SGD 0.01 per 16 images, 90k steps, drops at
60k and 80k, 1000 warm-up steps; 1000 candidates per level, NMS 0.5, 100 detections.

Start from ImageNet weights as the paper does: convert them once with scripts/convert_weights.py and
pass `--config.init_from=DIR` (`init_mode='backbone'`).
"""

from retinanet_jax import config as config_lib


def get_config(arg: str | None = None):
  return config_lib.apply_variant(config_lib.default_config(), arg)
