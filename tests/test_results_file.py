"""COCO results files (retinanet_jax/metrics/results_file.py): every problem of a file named in one
pass, the COCO server's file name, nothing overwritten; and the progress lines of a long loop
(retinanet_jax/runtime/console.py) in a pipe or a log."""

import io
import json

import pytest

from retinanet_jax.metrics import results_file
from retinanet_jax.runtime import console

GT = {"images": [{"id": 1, "width": 10, "height": 10}, {"id": 2, "width": 10, "height": 10}],
      "categories": [{"id": 3, "name": "a"}], "annotations": []}


def test_a_good_file_reads_back(tmp_path):
  good = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 3.5], "score": 0.9, "extra": "ok"}]
  path = tmp_path / "r.json"
  results_file.write_results(str(path), good)
  assert results_file.read_results(str(path), ground_truth=GT) == good
  with pytest.raises(FileExistsError):
    results_file.write_results(str(path), good)


def test_every_problem_is_listed_once_by_kind(tmp_path):
  bad = [{"image_id": 9, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5},
         {"image_id": 1, "category_id": 4, "bbox": [0, 0, 1], "score": float("nan")},
         {"image_id": "1", "category_id": 3, "bbox": [0, 0, -1, 1], "score": 1},
         [1, 2],
         {"image_id": 2, "bbox": [0, 0, 1, 1]}]
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(bad).replace("NaN", "NaN"))
  with pytest.raises(results_file.ResultsFileError) as e:
    results_file.read_results(str(path), ground_truth=GT)
  text = str(e.value)
  assert text.startswith(f"{path}: 8 problem(s) in 5 detections")
  for kind in ("image_id not in the ground truth (1): entry 0: 9",
               "category_id not in the ground truth's categories (1): entry 1: 4",
               "bbox not 4 finite numbers (1)", "score not a finite number (1)",
               "image_id not an integer (1)", "bbox with a negative width or height (1)",
               "not an object (1): entry 3"):
    assert kind in text, kind
  assert "missing keys (1): entry 4: ['category_id', 'score']" in text
  (tmp_path / "x.json").write_text("{not json")
  with pytest.raises(results_file.ResultsFileError, match="not JSON"):
    results_file.read_results(str(tmp_path / "x.json"), ground_truth=GT)
  with pytest.raises(results_file.ResultsFileError, match="a JSON list of detections, got a dict"):
    results_file.check_results({"a": 1}, ground_truth=GT, where="f")


def test_submission_name():
  assert (results_file.submission_name("test-dev2017", "retinanet")
          == "detections_test-dev2017_retinanet_results.json")
  with pytest.raises(ValueError, match="algorithm must be"):
    results_file.submission_name("test-dev2017", "my_net")  # '_' would split the name


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_in_a_pipe_prints_a_line_every_period_and_a_last_one():
  clock, pipe = _Clock(), io.StringIO()
  items = []
  for i in console.progress(range(10), desc="Evaluating 40 images", total=10, every_seconds=30,
                            stream=pipe, clock=clock):
    clock.now += 10.0  # each batch takes 10 s
    items.append(i)
  assert items == list(range(10))
  lines = pipe.getvalue().splitlines()
  assert lines[0] == "Evaluating 40 images: 3/10 batches (30%), 0.10 batches/s, ETA 1 min 10 s"
  assert lines[-1] == "Evaluating 40 images: 10/10 batches (100%), 0.10 batches/s in 1 min 40 s"
  assert len(lines) == 4 and "\r" not in pipe.getvalue()
  quick = io.StringIO()
  list(console.progress(range(3), desc="x", total=3, stream=quick, clock=_Clock()))
  assert quick.getvalue() == ""  # work that ends within a period prints nothing


def test_format_duration():
  assert [console.format_duration(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]
