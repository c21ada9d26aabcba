"""RetinaNet R-50-FPN on SKU-110K (Goldman et al., "Precise Detection in Densely Packed Scenes",
CVPR 2019): retail shelves, one class, ~150 objects per image on average and several hundred on many.

    python scripts/prepare_dataset.py --name sku110k --format sku110k \\
      --annotations train=SKU110K/annotations/annotations_train.csv --images train=SKU110K/images \\
      --annotations validation=SKU110K/annotations/annotations_val.csv \\
      --images validation=SKU110K/images
    python scripts/train.py --config=configs/sku110k.py --workdir=runs/sku110k \\
      --config.init_from=weights/r50_imagenet

What we chose, and why:
  * input: the paper's RetinaNet baseline is keras-retinanet at its default size, short side 800,
    long side at most 1333; we keep 800/1333 (the photos are ~3000 x 4000 px, so products of ~1/15
    of the width become ~50 px, well inside the P3-P7 anchors), with horizontal flips;
  * caps: `data.max_boxes` 800 (above SKU-110K's densest images; prepare_dataset.py prints the
    largest count of your copy and the cap it needs, and boxes past the cap are counted in the
    log); `eval.max_detections` 1000 and `eval.topk_candidates` 2000 per level, so that neither
    caps an image of several hundred products before NMS;
  * metrics: the paper reports AP, AP75 and AR300 (COCO's AP with up to 300 detections per image):
    `eval.max_dets` (1, 10, 100, 300), so AP is AP@300; counting MAE/RMSE with the score
    threshold chosen on the validation split (evaluation/counting.py); `eval.nms_mode` 'tiled';
  * one class ("object"); the paper's 1x schedule shape scaled to 8,233 training images: 15k steps
    of 16 images (~29 epochs), drops at 10k and 13k (our choice; the paper does not give ours).
"""

from retinanet_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.data.name = "sku110k"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.train_min_size_range = (800, 800)
  c.data.eval_min_size = 800
  c.data.max_size = 1333
  c.data.max_boxes = 800
  c.model.num_classes = 1
  c.eval.max_detections = 1000
  c.eval.topk_candidates = 2000
  c.eval.max_dets = (1, 10, 100, 300)
  c.eval.nms_mode = "tiled"
  c.eval.count_score_threshold = None
  c.eval.num_images_png = 4
  c.train.steps = 15_000
  c.train.decay_steps = (10_000, 13_000)
  c.train.checkpoint_every = 2500
  return config_lib.apply_variant(c, arg)
