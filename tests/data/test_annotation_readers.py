"""SKU-110K CSV and CARPK text readers on small fixtures: COCO dicts, bad rows named, the TFDS form."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from retinanet_jax.data import annotation_readers, coco_format
from retinanet_jax.data.coco_validation import ProblemKind, Report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _image(path, width, height):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)


def _messages(report, kind):
  return [p.message for p in report.problems if p.kind == kind]


@pytest.fixture
def sku(tmp_path):
  _image(tmp_path / "images" / "train_0.jpg", 40, 30)
  _image(tmp_path / "images" / "train_1.jpg", 50, 20)
  rows = [
      "train_0.jpg,1,2,11,12,object,40,30",       # line 1: kept
      "train_0.jpg,20,5,30,25,object,40,30",      # 2: kept
      "train_0.jpg,5,5,9,object,40,30",           # 3: 7 columns
      "train_1.jpg,10,2,4,8,object,50,20",        # 4: negative width
      "train_9.jpg,1,1,5,5,object,50,20",         # 5: unknown image
      "train_1.jpg,1,1,5,five,object,50,20",      # 6: non-numeric
      "",                                          # 7: blank, ignored
      "train_1.jpg,0,0,50,20,object,50,20",       # 8: kept
      "train_1.jpg,1,1,2,2,object,60,20",         # 9: another size for train_1.jpg
      "train_9.jpg,2,2,6,6,object,50,20",         # 10: unknown image again
  ]
  (tmp_path / "annotations_train.csv").write_text("\n".join(rows) + "\n")
  return tmp_path


def test_sku110k_csv_to_coco_with_bad_rows_named(sku):
  report = Report()
  path = str(sku / "annotations_train.csv")
  coco = annotation_readers.read_sku110k_csv(path, str(sku / "images"), report, split="train")
  assert coco["images"] == [{"id": 1, "file_name": "train_0.jpg", "width": 40, "height": 30},
                            {"id": 2, "file_name": "train_1.jpg", "width": 50, "height": 20}]
  assert [(a["image_id"], a["bbox"]) for a in coco["annotations"]] == [
      (1, [1, 2, 10, 10]), (1, [20, 5, 10, 20]), (2, [0, 0, 50, 20])]
  assert coco["categories"] == [{"id": 1, "name": "object"}]
  malformed = _messages(report, ProblemKind.MALFORMED_ROW)
  assert len(malformed) == 3
  assert malformed[0].startswith(f"{path}:3: 7 columns, expected 8 (image_name,x1,y1,x2,y2,class,")
  assert malformed[1] == f"{path}:6: y2 'five' is not a finite number"
  assert malformed[2].startswith(f"{path}:9: image 'train_1.jpg' is 60 x 20 here but 50 x 20")
  assert _messages(report, ProblemKind.EMPTY_BOX) == [
      f"{path}:4: box [10, 2, 4, 8] has width -6 and height 6 (both must be > 0)"]
  unknown = _messages(report, ProblemKind.UNKNOWN_IMAGE_FILE)
  assert [m.split(": ")[0] for m in unknown] == [f"{path}:5", f"{path}:10"]
  assert "image 'train_9.jpg' is not in" in unknown[0]


def test_carpk_to_coco_with_bad_rows_named(tmp_path):
  data = tmp_path / "CARPK_devkit" / "data"
  _image(data / "Images" / "a.png", 64, 48)
  _image(data / "Images" / "b.png", 64, 48)
  os.makedirs(data / "Annotations")
  os.makedirs(data / "ImageSets")
  (data / "Annotations" / "a.txt").write_text("1 2 11 12 1\n20 5 30 25 1\n5 5 9 1\n")
  (data / "Annotations" / "b.txt").write_text("10 2 4 8 1\n0 0 64 48 1\n")
  (data / "Annotations" / "c.txt").write_text("1 1 5 5 1\n")  # no image c.png
  (data / "ImageSets" / "train.txt").write_text("a\nb\nc\n")
  report = Report()
  coco = annotation_readers.read_carpk(str(data / "ImageSets" / "train.txt"), str(data / "Images"),
                                       report, split="train")
  assert coco["images"] == [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                            {"id": 2, "file_name": "b.png", "width": 64, "height": 48}]
  assert [(a["image_id"], a["bbox"], a["category_id"]) for a in coco["annotations"]] == [
      (1, [1, 2, 10, 10], 1), (1, [20, 5, 10, 20], 1), (2, [0, 0, 64, 48], 1)]
  assert coco["categories"] == [{"id": 1, "name": "car"}]
  annotations = data / "Annotations"
  assert _messages(report, ProblemKind.MALFORMED_ROW) == [
      f"{annotations / 'a.txt'}:3: 4 columns, expected 5 (x1 y1 x2 y2 class): '5 5 9 1'"]
  assert _messages(report, ProblemKind.EMPTY_BOX)[0].startswith(f"{annotations / 'b.txt'}:1: box")
  assert _messages(report, ProblemKind.UNKNOWN_IMAGE_FILE) == [
      f"{annotations / 'c.txt'}: image 'c.png' is not in {data / 'Images'}"]
  # A folder of annotation files instead of a list: every file.
  every = annotation_readers.read_carpk(str(annotations), str(data / "Images"), Report())
  assert [im["file_name"] for im in every["images"]] == ["a.png", "b.png"]


def test_prepare_dataset_sku110k_end_to_end(sku):
  env = {**os.environ, "PYTHONPATH": REPO}
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "prepare_dataset.py"), "--format", "sku110k",
       "--annotations", f"train={sku / 'annotations_train.csv'}", "--images",
       f"train={sku / 'images'}", "--name", "sku_small", "--data_dir", str(sku / "tfds")],
      env=env, capture_output=True, text=True, cwd=sku)
  assert result.returncode == 0, result.stderr
  assert "skip malformed_row" in result.stdout and "annotations_train.csv:3: 7 columns" in result.stdout
  assert "largest box count per image: train 2 (image id 1); suggested cap: " \
         "--config.data.max_boxes=100" in result.stdout
  builder = tfds.builder("sku_small", data_dir=str(sku / "tfds"))
  assert builder.info.splits["train"].num_examples == 2
  gt = json.loads(coco_format.read_dataset_file(builder, "ground_truth_train.json"))
  assert len(gt["annotations"]) == 3
  report = json.loads(coco_format.read_dataset_file(builder, coco_format.REPORT_FILE))
  assert report["largest_box_count"] == {"train": {"boxes": 2, "image_id": 1}}
  assert report["counts"] == {"empty_box": 1, "malformed_row": 3, "unknown_image_file": 2}
