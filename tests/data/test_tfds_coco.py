"""The TFDS coco/2017 path under tfds.testing.mock_data, with hand-written records.

mock_data's default random records are not valid COCO (the object fields get different lengths), so
the mock serves known examples encoded with coco/2017's real feature spec and parsed back by TFDS.
"""

import io
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from retinanet_jax.data import (COCO_LABEL_MAP, coco_ground_truth, config as config_lib,
                                label_map, load_examples, make_eval_input, make_train_input)


def _jpeg(height, width, value):
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), (value,) * 3).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


RECORDS = [
    {"image": _jpeg(40, 60, 128), "image/filename": "a.jpg", "image/id": 5,
     "objects": [
         {"id": 501, "area": 123, "label": 0, "is_crowd": False,
          "bbox": tfds.features.BBox(ymin=0.1, xmin=0.25, ymax=0.5, xmax=0.75)},
         {"id": 502, "area": 40, "label": 79, "is_crowd": True,
          "bbox": tfds.features.BBox(ymin=0.0, xmin=0.0, ymax=1.0, xmax=0.5)},
     ]},
    {"image": _jpeg(30, 20, 128), "image/filename": "b.jpg", "image/id": 9, "objects": []},
]


def _as_dataset(self, split, decoders=None, read_config=None, **kwargs):
  del split, read_config, kwargs
  features = self.info.features
  serialized = [features.serialize_example(r) for r in RECORDS]
  return tf.data.Dataset.from_tensor_slices(serialized).map(
      lambda s: features.deserialize_example(s, decoders=decoders))


@pytest.fixture
def coco_config():
  c = config_lib.default_data_config()
  assert c.name == "coco/2017"
  c.eval_min_size, c.max_size, c.pad_multiple = 80, 120, 32
  c.train_min_size_range = (80, 80)
  c.hflip_prob = 0.0
  c.shuffle_buffer = 1
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset):
    yield c


def test_tfds_boxes_become_pixels_and_labels_stay_contiguous(coco_config):
  examples = list(load_examples(coco_config, "validation").as_numpy_iterator())
  assert [int(e["image_id"]) for e in examples] == [5, 9]
  a = examples[0]
  np.testing.assert_array_equal(a["original_hw"], [40, 60])
  # [ymin, xmin, ymax, xmax] normalized -> [x1, y1, x2, y2] * (w=60, h=40).
  np.testing.assert_allclose(a["boxes"], [[15, 4, 45, 20], [0, 0, 30, 40]], rtol=1e-6)
  np.testing.assert_array_equal(a["labels"], [0, 79])
  np.testing.assert_array_equal(a["is_crowd"], [False, True])
  assert a["image"].shape == (40, 60, 3) and examples[1]["boxes"].shape == (0, 4)


def test_label_map_is_coco_category_ids(coco_config):
  lm = label_map(coco_config)
  assert lm is COCO_LABEL_MAP and lm.num_classes == 80
  assert lm.to_category_id(0) == 1 and lm.to_category_id(79) == 90
  assert lm.names[0] == "person" and lm.names[79] == "toothbrush"


def test_ground_truth_rebuilt_from_the_tfds_split(coco_config):
  gt = coco_ground_truth(coco_config)
  assert gt["images"] == [
      {"id": 5, "height": 40, "width": 60, "file_name": "a.jpg"},
      {"id": 9, "height": 30, "width": 20, "file_name": "b.jpg"}]
  a, b = gt["annotations"]
  assert (a["id"], a["source_id"], a["category_id"], a["iscrowd"], a["area"]) == (1, 501, 1, 0, 123)
  assert (b["id"], b["source_id"], b["category_id"], b["iscrowd"]) == (2, 502, 90, 1)
  np.testing.assert_allclose(a["bbox"], [15, 4, 30, 16], rtol=1e-6)
  np.testing.assert_allclose(b["bbox"], [0, 0, 30, 40], rtol=1e-6)
  assert len(gt["categories"]) == 80 and gt["categories"][11] == {"id": 13, "name": "stop sign"}


def test_ground_truth_from_an_annotation_file_is_restricted_to_the_split(coco_config, tmp_path):
  path = tmp_path / "instances_val2017.json"
  path.write_text(json.dumps({
      "images": [{"id": 5}, {"id": 9}, {"id": 1000}],
      "annotations": [{"id": 1, "image_id": 5}, {"id": 2, "image_id": 1000}],
      "categories": [{"id": 1, "name": "person"}]}))
  coco_config.eval_annotations = str(path)
  gt = coco_ground_truth(coco_config)
  assert [im["id"] for im in gt["images"]] == [5, 9]
  assert [a["id"] for a in gt["annotations"]] == [1]


def test_train_and_eval_batches_from_tfds_coco(coco_config):
  # eval: 40x60 -> scale min(80/40, 120/60) = 2 -> 80x120; 30x20 -> min(4, 4) = 4 -> 120x80.
  (batch,) = list(make_eval_input(coco_config, global_batch_size=2, mesh=None).numpy_batches())
  np.testing.assert_array_equal(batch["image_id"], [5, 9])
  np.testing.assert_array_equal(batch["image_hw"], [[80, 120], [120, 80]])
  np.testing.assert_allclose(batch["boxes"][0, :2], [[30, 8, 90, 40], [0, 0, 60, 80]], rtol=1e-6)
  np.testing.assert_array_equal(batch["is_crowd"][0, :3], [False, True, False])
  assert batch["image"].shape == (2, 128, 128, 3)
  train = make_train_input(coco_config, global_batch_size=2, mesh=None, process_index=0,
                           process_count=1)
  b = train.next_numpy()
  assert sorted(b["image_id"].tolist()) == [5, 9] and b["labels"].dtype == np.int32
