"""evaluation.py: detections through the library's conversion give pycocotools' own numbers."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet_jax import evaluation

GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 60, "height": 60},
               {"id": 3, "width": 50, "height": 50}],  # image 3: no annotation (a negative)
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [50, 40, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [5, 5, 50, 50], "area": 2500, "iscrowd": 0},
    ],
    "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}, {"id": 11, "name": "c"}],
}


def pycocotools_stats(gt, results, tmp_path):
  gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
  gt_path.write_text(json.dumps({**gt, "info": {}, "licenses": []}))
  dt_path.write_text(json.dumps(results))
  coco = COCO(str(gt_path))
  e = COCOeval(coco, coco.loadRes(str(dt_path)), "bbox")
  e.evaluate()
  e.accumulate()
  e.summarize()
  return e.stats


def test_known_detections_give_pycocotools_numbers(tmp_path):
  # Library-form detections on images resized by 2x (image 1) and 0.5x (image 2); class 0 -> id 5.
  scale = np.array([[2.0, 2.0], [0.5, 0.5]])
  boxes = np.zeros((2, 3, 4))
  boxes[0, 0] = np.array([10, 10, 40, 30]) * 2           # exact
  boxes[0, 1] = np.array([52, 41, 90, 70]) * 2           # close (class b)
  boxes[0, 2] = np.array([0, 0, 20, 20]) * 2             # false positive
  boxes[1, 0] = np.array([8, 6, 55, 52]) * 0.5           # IoU ~0.87
  scores = np.array([[0.9, 0.8, 0.7], [0.6, 0.0, 0.0]])
  classes = np.array([[0, 1, 0], [0, -1, -1]])
  valid = np.array([[True, True, True], [True, False, False]])
  results = evaluation.detections_to_coco(image_ids=[1, 2], boxes=boxes, scores=scores,
                                          classes=classes, valid=valid, category_ids=[5, 9, 11],
                                          scale=scale)
  assert len(results) == 4
  np.testing.assert_allclose(results[0]["bbox"], [10, 10, 30, 20])
  assert results[1]["category_id"] == 9
  ours = evaluation.coco_evaluate(GT, results)
  ref = pycocotools_stats(GT, results, tmp_path)
  np.testing.assert_allclose([ours[n] for n in evaluation.METRIC_NAMES], ref)
  assert 0 < ours["AP"] < 1


def test_perfect_detections_give_ap_one():
  results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
              "score": 1.0} for a in GT["annotations"]]
  metrics = evaluation.coco_evaluate(GT, results)
  assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_what_real_data_does_never_raises():
  assert evaluation.coco_evaluate(GT, [])["AP"] == 0.0  # no detections at all
  empty = {**GT, "annotations": []}
  assert evaluation.coco_evaluate(empty, [])["AP"] == -1.0  # nothing to evaluate
  # Detections only on the unannotated image, in a category without ground truth.
  fp = [{"image_id": 3, "category_id": 11, "bbox": [1, 1, 10, 10], "score": 0.5}]
  assert evaluation.coco_evaluate(GT, fp)["AP"] == 0.0
  assert "n/a" in evaluation.format_table({n: -1.0 for n in evaluation.METRIC_NAMES})


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="image ids absent"):
    evaluation.coco_evaluate(GT, [{"image_id": 99, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1}])
  with pytest.raises(ValueError, match="classes must be in 0..2"):
    evaluation.detections_to_coco(image_ids=[1], boxes=np.zeros((1, 1, 4)), scores=np.ones((1, 1)),
                                  classes=np.array([[3]]), valid=np.ones((1, 1), bool),
                                  category_ids=[5, 9, 11])
  with pytest.raises(ValueError, match="'annotations'"):
    evaluation.coco_evaluate({"images": []}, [])
