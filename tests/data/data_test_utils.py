"""Shared data and helpers of the input-pipeline tests (imported as a top-level module: pytest puts
tests/data on sys.path)."""

import json

import numpy as np
from PIL import Image

# Three images with hand-placed boxes; the expected tensors in test_coco_format.py are computed by
# hand from these numbers. Category ids 7 and 3: labels follow increasing id, so 3 -> 0, 7 -> 1.
THREE_IMAGES = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 20, "height": 20},
        {"id": 3, "file_name": "c.jpg", "width": 30, "height": 40},
    ],
    "annotations": [
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [4, 3, 10, 6], "iscrowd": 0,
         "area": 55.5},
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [20, 10, 15, 20], "iscrowd": 1},
        {"id": 13, "image_id": 3, "category_id": 7, "bbox": [0, 0, 30, 40], "iscrowd": 0},
    ],
    "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
}
COLOURS = {1: (10, 20, 30), 2: (200, 100, 0), 3: (128, 128, 128)}


def write_images(folder, coco, colours=None):
  folder.mkdir(parents=True, exist_ok=True)
  for record in coco["images"]:
    colour = (colours or COLOURS).get(record["id"], (50, 60, 70))
    image = Image.new("RGB", (record["width"], record["height"]), colour)
    image.save(folder / record["file_name"])


def write_coco(folder, coco, name="instances.json"):
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / name
  path.write_text(json.dumps(coco))
  return path


def assert_tree_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
