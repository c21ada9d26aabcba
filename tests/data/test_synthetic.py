"""The synthetic dataset: deterministic, as hard as its docstring says, built fast, built once."""

import os

import numpy as np
import pytest

from retinanet_jax.data import (SyntheticConfig, coco_ground_truth, config as config_lib,
                                ensure_synthetic_dataset, label_map, sources, synthetic)


def _iou_matrix(boxes):
  x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
  y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
  x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
  y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
  inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return inter / (area[:, None] + area[None, :] - inter)


def test_same_config_same_bytes_other_seed_other_images():
  config = SyntheticConfig(image_size=48, num_train=5, num_validation=3, min_object_size=6)
  a, b = synthetic.make_coco_splits(config), synthetic.make_coco_splits(config)
  for split in synthetic.SPLITS:
    assert a[split][0] == b[split][0]
    assert a[split][1] == b[split][1]
  assert a["train"][1][1] != a["validation"][1][1]  # the splits are different images
  other = synthetic.make_coco_splits(SyntheticConfig(image_size=48, num_train=5, num_validation=3,
                                                     min_object_size=6, seed=1))
  assert other["train"][1][1] != a["train"][1][1]


def test_default_images_are_varied_cluttered_and_mostly_small():
  config = SyntheticConfig()
  boxes, labels, empty, overlapping = [], [], 0, 0
  for i in range(150):
    image, b, l = synthetic.render_image(np.random.default_rng([9, i]), config)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 128).all() and (b[:, 2:] > b[:, :2]).all()
    empty += len(b) == 0
    if len(b) > 1:
      iou = _iou_matrix(b)
      overlapping += (iou[np.triu_indices(len(b), 1)] > 0).any()
    boxes.append(b)
    labels.append(l)
  boxes, labels = np.concatenate(boxes), np.concatenate(labels)
  sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
  assert set(labels.tolist()) == set(range(6))
  assert sides.min() <= 10 and sides.max() >= 80  # ~8 px to most of the image
  assert (sides < 32).mean() > 0.4  # many small objects
  assert empty >= 3 and overlapping >= 20
  # The background is textured and noisy, not flat.
  image, _, _ = synthetic.render_image(np.random.default_rng([9, 0]), config)
  assert image.reshape(-1, 3).std(axis=0).min() > 8


def test_knobs_change_the_dataset_name_and_round_trip_through_config_dicts():
  c = config_lib.synthetic_data_config()
  name = sources.tfds_name(c)
  assert name.startswith("retinanet_synthetic/s128_")
  c.synthetic.num_train = 10
  assert sources.tfds_name(c) != name
  assert SyntheticConfig.from_config(c.synthetic).num_train == 10
  with pytest.raises(ValueError, match="num_classes must be in 6..8"):
    SyntheticConfig(num_classes=5)


def test_default_dataset_builds_once(tmp_path):
  c = config_lib.synthetic_data_config()
  c.data_dir = str(tmp_path)
  name = ensure_synthetic_dataset(c)  # its build time is measured, not asserted (shared machines)
  info = os.path.join(str(tmp_path), name, "1.0.0", "dataset_info.json")
  mtime = os.path.getmtime(info)
  assert ensure_synthetic_dataset(c) == name and os.path.getmtime(info) == mtime

  builder = sources.open_builder(c)
  assert builder.info.splits["train"].num_examples == 3000
  assert builder.info.splits["validation"].num_examples == 300
  lm = label_map(c)
  assert lm.category_ids == (1, 2, 3, 4, 5, 6) and lm.names[1] == "green_circle"
  gt = coco_ground_truth(c)
  assert len(gt["images"]) == 300 and len(gt["annotations"]) > 600


def test_dense_layout_packs_hundreds_of_small_touching_objects():
  config = SyntheticConfig(image_size=192, layout="dense", min_object_size=10,
                           max_object_fraction=0.1, max_objects=400, dense_gap=1.0)
  touching = 0
  for i in range(3):
    image, boxes, labels = synthetic.render_image(np.random.default_rng([4, i]), config)
    assert image.shape == (192, 192, 3) and image.dtype == np.uint8
    assert 120 <= len(boxes) <= 400 and set(labels.tolist()) == set(range(6))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 192).all()
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sides.max() <= 20  # small: 10-19 px cells, boxes tight around the drawn pixels
    iou = _iou_matrix(boxes)
    np.fill_diagonal(iou, 0)
    assert iou.max() == 0  # side by side, never overlapping
    # Neighbours in a shelf: the next box starts at most dense_gap + 1 px after the previous ends.
    gaps = boxes[1:, 0] - boxes[:-1, 2]
    same_shelf = np.abs(boxes[1:, 3] - boxes[:-1, 3]) <= 1  # standing on one shelf line
    touching += int(((gaps >= 0) & (gaps <= 2) & same_shelf).sum())
  assert touching > 200
  # The dense knobs name another dataset; the scattered layout's names do not depend on them (the
  # datasets built before the dense layout existed keep their names).
  assert config.fingerprint() != SyntheticConfig(image_size=192).fingerprint()
  assert SyntheticConfig().fingerprint() == SyntheticConfig(dense_gap=5.0).fingerprint()
  with pytest.raises(ValueError, match="layout"):
    SyntheticConfig(layout="grid")
