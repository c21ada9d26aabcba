"""evaluation/counting.py on hand-computed cases."""

import math

import numpy as np
import pytest

from retinanet_jax.metrics import counting

# Three images: 3, 0 and 2 non-crowd objects (image 1 also has a crowd box, not counted).
GT = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}],
    "annotations": [
        {"image_id": 1, "iscrowd": 0}, {"image_id": 1, "iscrowd": 0}, {"image_id": 1, "iscrowd": 0},
        {"image_id": 1, "iscrowd": 1}, {"image_id": 3, "iscrowd": 0}, {"image_id": 3},
    ],
}
# Scores per image: image 1: 0.9, 0.8, 0.3, 0.1; image 2: 0.6; image 3: 0.95.
DETECTIONS = [{"image_id": 1, "score": s} for s in (0.9, 0.8, 0.3, 0.1)] + [
    {"image_id": 2, "score": 0.6}, {"image_id": 3, "score": 0.95}, {"image_id": 99, "score": 0.9}]


def test_counts_and_errors_by_hand():
  np.testing.assert_array_equal(counting.true_counts(GT, [1, 2, 3]), [3, 0, 2])
  # Threshold 0.5: counts 2, 1, 1 -> errors -1, +1, -1: MAE 1, RMSE 1.
  np.testing.assert_array_equal(counting.predicted_counts(DETECTIONS, [1, 2, 3], threshold=0.5),
                                [2, 1, 1])
  m = counting.count_metrics(GT, DETECTIONS, threshold=0.5)
  assert m == {"count_mae": 1.0, "count_rmse": 1.0, "count_threshold": 0.5,
               "count_threshold_chosen": 0.0}
  # Threshold 0.05: counts 4, 1, 1 -> errors +1, +1, -1: MAE 1, RMSE 1; 0.2: 3, 1, 1 -> 0, 1, -1:
  # MAE 2/3, RMSE sqrt(2/3).
  m = counting.count_metrics(GT, DETECTIONS, threshold=0.2)
  assert m["count_mae"] == pytest.approx(2 / 3) and m["count_rmse"] == pytest.approx(math.sqrt(2 / 3))
  assert counting.count_errors([5, 0], [2, 4]) == (3.5, pytest.approx(math.sqrt(12.5)))
  # A score exactly at the threshold counts (>=).
  assert counting.predicted_counts(DETECTIONS, [2], threshold=0.6).tolist() == [1]


def test_threshold_chosen_on_the_split():
  # Over the grid 0.05..0.95, MAE: 1 below 0.1 (exclusive 0.1 counts the 0.1 detection: 4,1,1),
  # 2/3 on (0.1, 0.3], 1 on (0.3, 0.6], ... The first threshold of the best MAE: 0.11.
  m = counting.count_metrics(GT, DETECTIONS)
  assert m["count_threshold"] == 0.11 and m["count_threshold_chosen"] == 1.0
  assert m["count_mae"] == pytest.approx(2 / 3)
  # Ties on MAE are broken by RMSE: true counts (0, 1); at 0.3 the counts are (2, 1), errors (2, 0):
  # MAE 1, RMSE sqrt(2); at 0.6 (1, 0), errors (1, -1): MAE 1, RMSE 1.
  scores = [np.array([0.9, 0.5]), np.array([0.4])]
  assert counting.choose_threshold(scores, [0, 1], grid=(0.3, 0.6)) == 0.6
  # Equal MAE and RMSE: the lower threshold.
  assert counting.choose_threshold([np.array([0.9])], [1], grid=(0.6, 0.3)) == 0.3


def test_edge_cases():
  assert counting.count_metrics({"images": []}, DETECTIONS)["count_mae"] == -1.0
  no_detections = counting.count_metrics(GT, [], threshold=0.5)
  assert no_detections["count_mae"] == pytest.approx(5 / 3)  # counts 0, 0, 0 against 3, 0, 2
  with pytest.raises(ValueError, match="counts"):
    counting.count_errors([1, 2], [1])
  assert "count MAE 1.00, RMSE 1.00 (score >= 0.50, given)" == counting.format_counts(
      counting.count_metrics(GT, DETECTIONS, threshold=0.5))
