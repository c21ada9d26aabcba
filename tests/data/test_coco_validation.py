"""One-pass validation: a dataset with one of each problem gives one report naming every planted id;
the CLI exits non-zero only for fatal kinds, without a traceback; --dry_run writes no dataset."""

import json
import os
import subprocess
import sys

import pytest

from retinanet_jax.data import coco_format, coco_validation
from retinanet_jax.data.coco_validation import ProblemKind, Severity
from data_test_utils import THREE_IMAGES, write_coco, write_images

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K = ProblemKind

# kind -> the ids planted for it: (image id, annotation id, file name, category id), or a list of
# them; None: not named.
SKIPPABLE = {
    K.MISSING_IMAGE: (4, None, "missing.png", None),
    K.UNDECODABLE_IMAGE: (5, None, "garbage.png", None),
    K.IMAGE_SIZE_MISMATCH: (6, None, "wrong_size.png", None),
    K.EMPTY_BOX: (1, 21, "a.png", None),
    K.BOX_OUTSIDE_IMAGE: (1, 22, "a.png", None),
    K.UNKNOWN_CATEGORY_ID: (1, 23, "a.png", 99),
    K.UNKNOWN_IMAGE_ID: (77, 24, None, None),
    K.INVALID_BBOX: [(3, 25, "c.jpg", None), (3, 26, "c.jpg", None)],  # non-numeric, NaN
    K.INVALID_ISCROWD: (3, 27, "c.jpg", None),
    K.DUPLICATE_CATEGORY_NAME: (None, None, None, 5),  # a warning
}
FATAL = {
    K.DUPLICATE_IMAGE_ID: (8, None, "h2.png", None),
    K.DUPLICATE_FILE_NAME: (9, None, "b.png", None),
    K.MISSING_OR_INVALID_FIELD: (10, None, "j.png", None),
    K.IMAGE_ID_OUT_OF_RANGE: (2**31, None, "k.png", None),
    K.DUPLICATE_ANNOTATION_ID: (1, 28, None, None),
    K.DUPLICATE_CATEGORY_ID: (None, None, None, 3),
}


def _skippable_dataset(folder):
  """THREE_IMAGES plus one of each skippable problem (and the warning); images written."""
  coco = json.loads(json.dumps(THREE_IMAGES))
  coco["images"] += [
      {"id": 4, "file_name": "missing.png", "width": 10, "height": 10},
      {"id": 5, "file_name": "garbage.png", "width": 10, "height": 10},
      {"id": 6, "file_name": "wrong_size.png", "width": 10, "height": 10},
  ]
  coco["annotations"] += [
      {"id": 21, "image_id": 1, "category_id": 7, "bbox": [1, 1, -3, 5]},
      {"id": 22, "image_id": 1, "category_id": 7, "bbox": [30, 1, 20, 5]},
      {"id": 23, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},
      {"id": 24, "image_id": 77, "category_id": 7, "bbox": [1, 1, 5, 5]},
      {"id": 25, "image_id": 3, "category_id": 7, "bbox": ["1", 1, 5, 5]},
      {"id": 26, "image_id": 3, "category_id": 7, "bbox": [float("nan"), 1, 5, 5]},
      {"id": 27, "image_id": 3, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 2},
  ]
  coco["categories"].append({"id": 5, "name": "cat"})
  write_images(folder, {"images": coco["images"][:3]})
  (folder / "garbage.png").write_bytes(b"not an image at all")
  write_images(folder, {"images": [{"id": 6, "file_name": "wrong_size.png", "width": 12,
                                    "height": 10}]})
  return coco


def _everything_dataset(folder):
  """The skippable dataset plus one of each fatal problem."""
  coco = _skippable_dataset(folder)
  coco["images"] += [
      {"id": 8, "file_name": "h.png", "width": 10, "height": 10},
      {"id": 8, "file_name": "h2.png", "width": 10, "height": 10},
      {"id": 9, "file_name": "b.png", "width": 20, "height": 20},
      {"id": 10, "file_name": "j.png", "width": 10},
      {"id": 2**31, "file_name": "k.png", "width": 10, "height": 10},
  ]
  coco["annotations"] += [
      {"id": 28, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
      {"id": 28, "image_id": 1, "category_id": 7, "bbox": [2, 2, 5, 5]},
  ]
  coco["categories"].append({"id": 3, "name": "bird"})
  write_images(folder, {"images": coco["images"][-5:-4]})  # h.png: the first image id 8 is fine
  return coco


def _items(report_json, kind):
  return report_json["problems"][kind.key]["items"]


def _assert_names(report_json, expected):
  """Each kind in `expected` was reported as planted, naming exactly the planted ids."""
  for kind, planted in expected.items():
    assert kind.key in report_json["problems"], kind
    named = [(i.get("image_id"), i.get("annotation_id"), i.get("file_name"), i.get("category_id"))
             for i in _items(report_json, kind)]
    assert named == (planted if isinstance(planted, list) else [planted]), kind
    assert report_json["counts"][kind.key] == len(named)


def test_one_pass_names_every_planted_problem(tmp_path):
  coco = _everything_dataset(tmp_path / "images")
  validation = coco_validation.validate(
      {"train": (coco, coco_format.image_reader(tmp_path / "images"))})
  report = validation.report.to_json()
  assert report["fatal"]
  _assert_names(report, {**SKIPPABLE, **FATAL})
  assert "missing required field 'height'" in _items(report, K.MISSING_OR_INVALID_FIELD)[0][
      "message"]
  severities = {k: v["severity"] for k, v in report["problems"].items()}
  assert {k for k, v in severities.items() if v == "fatal"} == {k.key for k in FATAL}
  assert severities[K.DUPLICATE_CATEGORY_NAME.key] == "warning"
  # The second image id 8 and image 9 (a taken file name) are neither checked nor kept.
  assert [r["id"] for r, _, _ in validation.splits["train"]] == [1, 2, 3, 8]

  with pytest.raises(coco_format.CocoFormatError, match="duplicate image id 8") as e:
    coco_format.build_tfds_dataset("everything", {"train": coco_format.SplitSource(
        coco, coco_format.image_reader(tmp_path / "images"))}, data_dir=str(tmp_path / "tfds"))
  assert len(e.value.report.fatal) == len(FATAL) and not (tmp_path / "tfds").exists()


def test_strict_makes_skips_fatal_but_not_warnings(tmp_path):
  coco = _skippable_dataset(tmp_path / "images")
  reader = coco_format.image_reader(tmp_path / "images")
  lenient = coco_validation.validate({"train": (coco, reader)}).report
  assert not lenient.fatal
  strict = coco_validation.validate({"train": (coco, reader)}, strict=True).report
  assert {p.kind for p in strict.fatal} == {k for k in SKIPPABLE if k.severity == Severity.SKIP}


def _run(tmp_path, *args):
  command = [sys.executable, os.path.join(REPO, "scripts", "prepare_dataset.py"),
             "--images", str(tmp_path / "images"), "--data_dir", str(tmp_path / "tfds"), *args]
  return subprocess.run(command, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                        text=True, cwd=tmp_path)


def test_cli_reports_every_file_and_problem_then_stops_with_status_3(tmp_path):
  coco = _everything_dataset(tmp_path / "images")
  main = write_coco(tmp_path, coco, "train.json")
  (tmp_path / "validation.json").write_text('{"images": [}')
  (tmp_path / "extra.json").write_text("[1, 2]")
  result = _run(tmp_path, "--name", "everything", "--annotations", f"train={main}",
                "--annotations", f"validation={tmp_path / 'validation.json'}",
                "--annotations", f"extra={tmp_path / 'extra.json'}")
  assert result.returncode == 3, result.stderr  # a data problem (docs/failures.md, "Exit codes")
  assert "Traceback" not in result.stderr + result.stdout
  assert "error: stopped by 8 fatal problems" in result.stderr
  report = json.loads((tmp_path / "prepare_report.json").read_text())  # the default path
  _assert_names(report, {**SKIPPABLE, **FATAL})
  assert _items(report, K.MALFORMED_JSON)[0]["split"] == "validation"
  assert _items(report, K.NOT_COCO)[0]["split"] == "extra"
  for kind in list(SKIPPABLE) + list(FATAL) + [K.MALFORMED_JSON, K.NOT_COCO]:
    assert f" {kind.key} (" in result.stdout  # every kind printed with its count
  assert "annotation id 23 (image id 1, split 'train'): unknown category id 99" in result.stdout
  assert not (tmp_path / "tfds").exists()


def test_cli_dry_run_reports_skips_with_status_0_and_writes_no_dataset(tmp_path):
  coco = _skippable_dataset(tmp_path / "images")
  path = write_coco(tmp_path, coco)
  (tmp_path / "notes.json").write_text("mine")
  refused = _run(tmp_path, "--name", "skips", "--annotations", str(path), "--dry_run",
                 "--report", str(tmp_path / "notes.json"))
  assert refused.returncode == 6 and "not replacing it" in refused.stderr  # output exists
  assert (tmp_path / "notes.json").read_text() == "mine"

  result = _run(tmp_path, "--name", "skips", "--annotations", str(path), "--dry_run",
                "--report", str(tmp_path / "report.json"), "--max_listed", "1")
  assert result.returncode == 0, result.stderr
  assert "Traceback" not in result.stderr + result.stdout
  assert "dry run: no dataset written" in result.stdout
  assert "invalid_bbox (bbox is not 4 finite numbers [x, y, w, h]): 2" in result.stdout
  assert "... and 1 more" in result.stdout
  _assert_names(json.loads((tmp_path / "report.json").read_text()),
                SKIPPABLE)
  assert not (tmp_path / "tfds").exists()
  assert sorted(os.listdir(tmp_path)) == ["images", "instances.json", "notes.json", "report.json"]
