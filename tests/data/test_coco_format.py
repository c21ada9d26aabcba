"""COCO-format datasets: exact tensors for a hand-written dataset, every bad-input case, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from retinanet_jax.data import (coco_format, coco_ground_truth, label_map, load_examples,
                                make_eval_input, make_train_input)
from data_test_utils import THREE_IMAGES, write_coco, write_images

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_three_images_give_the_expected_padded_tensors(three_image_config):
  # eval_min_size 60, max_size 80: every image is scaled by exactly 2 (30x40 -> 60x80,
  # 20x20 -> min(60/20, 80/20) = 3 -> 60x60, 40x30 -> 80x60); padded to ceil(80/32)*32 = 96.
  eval_input = make_eval_input(three_image_config, global_batch_size=4, mesh=None)
  (batch,) = list(eval_input.numpy_batches())
  order = np.argsort(np.where(batch["example_mask"], batch["image_id"], 99))
  b = {k: v[order] for k, v in batch.items()}

  np.testing.assert_array_equal(b["example_mask"], [True, True, True, False])
  np.testing.assert_array_equal(b["image_id"], [1, 2, 3, -1])
  np.testing.assert_array_equal(b["image_hw"], [[60, 80], [60, 60], [80, 60], [0, 0]])
  np.testing.assert_allclose(b["scale"], [[2, 2], [3, 3], [2, 2], [1, 1]])
  assert b["image"].shape == (4, 96, 96, 3) and b["image"].dtype == np.uint8
  np.testing.assert_array_equal(b["image"][0, :60, :80], np.broadcast_to([10, 20, 30], (60, 80, 3)))
  assert not b["image"][0, 60:].any() and not b["image"][0, :, 80:].any()
  np.testing.assert_array_equal(b["image"][2, :80, :60], np.full((80, 60, 3), 128))
  assert not b["image"][3].any()

  # Labels: category 3 -> 0, 7 -> 1. Boxes [x, y, w, h] -> [x1, y1, x2, y2] * 2.
  np.testing.assert_allclose(b["boxes"][0], [[8, 6, 28, 18], [40, 20, 70, 60], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["labels"][0], [1, 0, 0])
  np.testing.assert_array_equal(b["box_mask"][0], [True, True, False])
  np.testing.assert_array_equal(b["is_crowd"][0], [False, True, False])
  assert not b["box_mask"][1].any()  # image 2 has no annotation and is kept
  np.testing.assert_allclose(b["boxes"][2], [[0, 0, 60, 80], [0, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["labels"][2], [1, 0, 0])
  assert b["boxes"].dtype == np.float32 and b["labels"].dtype == np.int32
  assert b["image_id"].dtype == np.int32 and b["image_hw"].dtype == np.int32


def test_train_batches_have_the_same_geometry_without_flip(three_image_config):
  train = make_train_input(three_image_config, global_batch_size=3, mesh=None,
                           process_index=0, process_count=1)
  b = train.next_numpy()
  assert sorted(b["image_id"].tolist()) == [1, 2, 3]
  i = int(np.flatnonzero(b["image_id"] == 1)[0])
  np.testing.assert_allclose(b["boxes"][i], [[8, 6, 28, 18], [40, 20, 70, 60], [0, 0, 0, 0]])
  assert b["example_mask"].all()
  assert train.stats.images == 3 and train.stats.dropped_boxes == 0


def test_examples_label_map_and_ground_truth_keep_the_dataset_ids(three_image_config):
  lm = label_map(three_image_config)
  assert lm.category_ids == (3, 7) and lm.names == ("dog", "cat")
  examples = {int(e["image_id"]): e for e in load_examples(three_image_config, "validation")
              .as_numpy_iterator()}
  np.testing.assert_allclose(examples[1]["boxes"], [[4, 3, 14, 9], [20, 10, 35, 30]])
  np.testing.assert_array_equal(examples[1]["original_hw"], [30, 40])
  np.testing.assert_array_equal(examples[3]["original_hw"], [40, 30])

  gt = coco_ground_truth(three_image_config)
  assert sorted(im["id"] for im in gt["images"]) == [1, 2, 3]
  anns = sorted(gt["annotations"], key=lambda a: a["source_id"])
  assert [a["source_id"] for a in anns] == [11, 12, 13]
  assert sorted(a["id"] for a in anns) == [1, 2, 3]
  assert [a["category_id"] for a in anns] == [7, 3, 7]
  assert [a["bbox"] for a in anns] == [[4, 3, 10, 6], [20, 10, 15, 20], [0, 0, 30, 40]]
  assert [a["iscrowd"] for a in anns] == [0, 1, 0]
  assert anns[0]["area"] == 55.5 and anns[1]["area"] == 300  # given area kept, else w * h
  assert gt["categories"] == [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}]

  three_image_config_sub = three_image_config.copy_and_resolve_references()
  three_image_config_sub.eval_split = "validation[:1]"
  sub = coco_ground_truth(three_image_config_sub)
  assert len(sub["images"]) == 1
  assert all(a["image_id"] == sub["images"][0]["id"] for a in sub["annotations"])


def _bad_dataset(tmp_path):
  coco = json.loads(json.dumps(THREE_IMAGES))
  coco["images"] += [
      {"id": 4, "file_name": "missing.png", "width": 10, "height": 10},
      {"id": 5, "file_name": "garbage.png", "width": 10, "height": 10},
      {"id": 6, "file_name": "wrong_size.png", "width": 10, "height": 10},
  ]
  coco["annotations"] += [
      {"id": 21, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 5]},
      {"id": 22, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, -2]},
      {"id": 23, "image_id": 1, "category_id": 7, "bbox": [30, 1, 20, 5]},
      {"id": 24, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},
      {"id": 25, "image_id": 77, "category_id": 7, "bbox": [1, 1, 5, 5]},
      {"id": 26, "image_id": 1, "category_id": 7, "bbox": [-0.5, 0, 40.5, 30]},  # clipped
  ]
  write_images(tmp_path / "images", {"images": coco["images"][:3]})
  (tmp_path / "images" / "garbage.png").write_bytes(b"not an image at all")
  write_images(tmp_path / "images", {"images": [{"id": 6, "file_name": "wrong_size.png",
                                                 "width": 12, "height": 10}]})
  return coco


def test_bad_images_and_annotations_are_counted_skips_that_name_their_ids(tmp_path):
  coco = _bad_dataset(tmp_path)
  source = coco_format.SplitSource(coco, coco_format.image_reader(tmp_path / "images"))
  builder, report = coco_format.build_tfds_dataset("bad_input", {"train": source},
                                                   data_dir=str(tmp_path / "tfds"))
  images = "\n".join(report.skipped_images)
  annotations = "\n".join(report.skipped_annotations)
  assert len(report.skipped_images) == 3 and len(report.skipped_annotations) == 5
  assert "image id 4 (missing.png" in images
  assert "image id 5 (garbage.png" in images
  assert "image id 6 (wrong_size.png" in images and "12x10 but its record says 10x10" in images
  assert "annotation id 21 (image id 1" in annotations
  assert "annotation id 22 (image id 1" in annotations
  assert annotations.count("non-positive width or height") == 2
  assert "annotation id 23 (image id 1, split 'train'): box [30, 1, 20, 5] lies outside the " \
         "40x30 image" in annotations
  assert "annotation id 24 (image id 1, split 'train'): unknown category id 99" in annotations
  assert "annotation id 25 (image id 77, split 'train'): unknown image id 77" in annotations
  summary = report.summary()
  assert "train: 3 images, 4 annotations" in summary
  assert "skipped 3 images, 5 annotations" in summary and "annotation id 24" in summary
  # The dataset holds the 3 good images (one without annotations); the clipped box is kept.
  assert builder.info.splits["train"].num_examples == 3
  gt = json.loads(coco_format.read_dataset_file(builder, coco_format.ground_truth_file("train")))
  clipped = [a for a in gt["annotations"] if a["source_id"] == 26]
  assert clipped[0]["bbox"] == [0.0, 0.0, 40.0, 30.0]
  stored = json.loads(coco_format.read_dataset_file(builder, coco_format.REPORT_FILE))
  assert stored["skipped_images"] == report.skipped_images


def test_strict_mode_turns_a_skip_into_an_error(tmp_path):
  coco = _bad_dataset(tmp_path)
  source = coco_format.SplitSource(coco, coco_format.image_reader(tmp_path / "images"))
  with pytest.raises(coco_format.CocoFormatError, match="annotation id 21 .*non-positive"):
    coco_format.build_tfds_dataset("bad_strict", {"train": source},
                                   data_dir=str(tmp_path / "tfds"), strict=True)
  assert not (tmp_path / "tfds" / "bad_strict" / coco_format.VERSION).exists()


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["images"].append(dict(c["images"][0])), "duplicate image id 1"),
    (lambda c: c["annotations"].append(dict(c["annotations"][0])), "duplicate annotation id 11"),
    (lambda c: c["categories"].append({"id": 7, "name": "x"}), "duplicate category id 7"),
    (lambda c: c["images"][0].pop("file_name"), "image id 1: missing required field 'file_name'"),
    (lambda c: c["annotations"][0].update(bbox="1 2 3 4"), "annotation id 11: field 'bbox'"),
    (lambda c: c["images"][1].update(id=2**31), "image id 2147483648 is outside"),
    (lambda c: c.pop("categories"), "'categories' must be a non-empty list"),
])
def test_structural_errors_name_what_is_wrong(tmp_path, mutate, message):
  # (Every problem of one file in one error: tests/data/test_coco_validation.py.)
  coco = json.loads(json.dumps(THREE_IMAGES))
  mutate(coco)
  source = coco_format.SplitSource(coco, lambda record: b"")
  with pytest.raises(coco_format.CocoFormatError, match=message):
    coco_format.build_tfds_dataset("structural", {"train": source},
                                   data_dir=str(tmp_path / "tfds"))


def test_malformed_json_is_an_error_naming_the_file(tmp_path):
  path = tmp_path / "instances.json"
  path.write_text('{"images": [}')
  with pytest.raises(coco_format.CocoFormatError, match=r"instances.json: malformed JSON"):
    coco_format.load_annotations(str(path))
  path.write_text("[1, 2]")
  with pytest.raises(coco_format.CocoFormatError, match="expected a JSON object"):
    coco_format.load_annotations(str(path))


def test_prepare_dataset_script_end_to_end(tmp_path):
  coco = json.loads(json.dumps(THREE_IMAGES))
  coco["annotations"].append({"id": 30, "image_id": 2, "category_id": 5, "bbox": [1, 1, 2, 2]})
  write_images(tmp_path / "images", coco)
  annotations = write_coco(tmp_path, coco)
  env = {**os.environ, "PYTHONPATH": REPO}
  command = [sys.executable, os.path.join(REPO, "scripts", "prepare_dataset.py"),
             "--annotations", str(annotations), "--images", str(tmp_path / "images"),
             "--name", "cli_boxes", "--data_dir", str(tmp_path / "tfds"),
             "--validation_fraction", "0.34"]
  run = lambda command: subprocess.run(command, env=env, capture_output=True, text=True,
                                       cwd=tmp_path)
  result = run(command)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "skipped 0 images, 1 annotations" in out
  assert "annotation id 30 (image id 2, split" in out and "unknown category id 5" in out
  builder = tfds.builder("cli_boxes", data_dir=str(tmp_path / "tfds"))
  assert builder.info.splits["train"].num_examples == 2
  assert builder.info.splits["validation"].num_examples == 1
  gt = json.loads(coco_format.read_dataset_file(builder, "ground_truth_validation.json"))
  assert len(gt["images"]) == 1

  # Rebuilding the same name is refused; --strict turns the skip into a fatal problem (exit code 3:
  # a data problem, docs/failures.md, "Exit codes").
  again = run(command)
  assert again.returncode == 3 and "already exists" in again.stderr
  assert "Traceback" not in again.stderr
  strict = run(command[:-6] + ["--name", "cli_strict", "--data_dir", str(tmp_path / "tfds"),
                               "--strict"])
  assert strict.returncode == 3 and "fatal problems (unknown_category_id)" in strict.stderr
  assert "unknown category id 5" in strict.stdout and "Traceback" not in strict.stderr


def test_visibility_and_ignore_fields_reach_the_stored_ground_truth(tmp_path):
  """Pedestrian datasets: the fields the miss-rate evaluator reads are kept as they are."""
  from retinanet_jax.data import coco_validation
  from retinanet_jax.data.labels import LabelMap
  coco = json.loads(json.dumps(THREE_IMAGES))
  coco["annotations"][0].update(vis_ratio=0.4, ignore=1, extra_field="dropped")
  coco["annotations"][2]["vis_bbox"] = [0, 0, 30, 20]
  write_images(tmp_path / "images", coco)
  validation = coco_validation.validate(
      {"validation": (coco, coco_format.image_reader(tmp_path / "images"))})
  kept = [(record, objects) for record, objects, _ in validation.splits["validation"]]
  gt = coco_format.ground_truth_dict(kept, LabelMap.from_categories(validation.categories))
  by_source = {a["source_id"]: a for a in gt["annotations"]}
  assert by_source[11]["vis_ratio"] == 0.4 and by_source[11]["ignore"] == 1
  assert "extra_field" not in by_source[11]
  assert by_source[13]["vis_bbox"] == [0, 0, 30, 20]
  assert set(by_source[12]) == {"id", "source_id", "image_id", "category_id", "bbox", "area",
                                "iscrowd"}
