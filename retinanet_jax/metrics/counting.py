"""Object counting from detections: per-image counts, their MAE and RMSE, and the score threshold.

A detector counts the objects of an image as its detections scoring at least a threshold `t`
(`count = #{d : score_d >= t}`, all classes together, as CARPK and SKU-110K count). Against the
ground-truth counts (the image's non-crowd annotations) over N images:

    MAE  = (1 / N) sum_i |count_i - true_i|
    RMSE = sqrt((1 / N) sum_i (count_i - true_i)^2)

(the CARPK paper's and the counting literature's definitions). Detections are capped at
`eval.max_detections` per image, so that cap must exceed the densest image's count.

The threshold: `eval.count_score_threshold` when given; otherwise chosen on the evaluated split
(the validation split during training) by `choose_threshold`: of the grid 0.05, 0.06, ..., 0.95
(`THRESHOLD_GRID`), the threshold with the lowest MAE, ties broken by the lower RMSE, then by the
lower threshold. A threshold chosen on a split and scored on the same split is optimistic: report a
test split's numbers with the threshold fixed (`--config.eval.count_score_threshold=T`, `T` from the
validation run's `count_threshold`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

THRESHOLD_GRID = tuple(round(0.05 + 0.01 * i, 2) for i in range(91))  # 0.05 ... 0.95
# count_threshold_chosen: 1.0 when the threshold was chosen on the evaluated split, 0.0 when given.
METRIC_NAMES = ("count_mae", "count_rmse", "count_threshold", "count_threshold_chosen")


def true_counts(ground_truth: Mapping, image_ids: Sequence[int]) -> np.ndarray:
  """Non-crowd annotations per image of a COCO-format ground truth: int64 `[N]` in `image_ids`'
  order (0 for an image without annotations)."""
  position = {int(i): k for k, i in enumerate(image_ids)}
  counts = np.zeros(len(position), np.int64)
  for ann in ground_truth.get("annotations", []):
    k = position.get(int(ann["image_id"]))
    if k is not None and not ann.get("iscrowd", 0):
      counts[k] += 1
  return counts


def predicted_counts(detections: Iterable[Mapping], image_ids: Sequence[int], *,
                     threshold: float) -> np.ndarray:
  """Detections (COCO results: dicts with `image_id` and `score`) scoring >= `threshold`, per image:
  int64 `[N]` in `image_ids`' order. Detections of other images are ignored."""
  scores = scores_by_image(detections, image_ids)
  return np.asarray([int(np.sum(s >= threshold)) for s in scores], np.int64)


def scores_by_image(detections: Iterable[Mapping], image_ids: Sequence[int]) -> list[np.ndarray]:
  """The detection scores of each image (float64 arrays) in `image_ids`' order."""
  position = {int(i): k for k, i in enumerate(image_ids)}
  lists: list[list[float]] = [[] for _ in position]
  for d in detections:
    k = position.get(int(d["image_id"]))
    if k is not None:
      lists[k].append(float(d["score"]))
  return [np.asarray(s, np.float64) for s in lists]


def count_errors(predicted, true) -> tuple[float, float]:
  """`(MAE, RMSE)` of predicted against true counts (`[N]` each, N >= 1), module docstring."""
  predicted = np.asarray(predicted, np.float64)
  true = np.asarray(true, np.float64)
  if predicted.shape != true.shape or predicted.ndim != 1 or predicted.size == 0:
    raise ValueError(f"predicted and true counts must be equal, non-empty [N], got "
                     f"{predicted.shape} and {true.shape}")
  error = predicted - true
  return float(np.mean(np.abs(error))), float(np.sqrt(np.mean(error ** 2)))


def choose_threshold(scores: Sequence[np.ndarray], true, *,
                     grid: Sequence[float] = THRESHOLD_GRID) -> float:
  """The grid threshold with the lowest count MAE over the images (ties: lower RMSE, then the lower
  threshold). `scores`: each image's detection scores; `true`: int `[N]`."""
  if not grid:
    raise ValueError("the threshold grid is empty")
  best = None
  for t in sorted(grid):
    predicted = [int(np.sum(s >= t)) for s in scores]
    key = count_errors(predicted, true)
    if best is None or key < best[0]:
      best = (key, t)
  return float(best[1])


def count_metrics(ground_truth: Mapping, detections: Iterable[Mapping], *,
                  threshold: float | None = None) -> dict[str, float]:
  """`{"count_mae", "count_rmse", "count_threshold", "count_threshold_chosen"}` over every image
  of `ground_truth` (a COCO-format dict), counting `detections` (COCO results) scoring >=
  `threshold`; `threshold` None: `choose_threshold` on these images. Empty ground truth (no
  images): every value -1."""
  image_ids = [int(im["id"]) for im in ground_truth.get("images", [])]
  if not image_ids:
    return {name: -1.0 for name in METRIC_NAMES}
  true = true_counts(ground_truth, image_ids)
  scores = scores_by_image(detections, image_ids)
  chosen = threshold is None
  if chosen:
    threshold = choose_threshold(scores, true)
  mae, rmse = count_errors([int(np.sum(s >= threshold)) for s in scores], true)
  return {"count_mae": mae, "count_rmse": rmse, "count_threshold": float(threshold),
          "count_threshold_chosen": float(chosen)}


def format_counts(metrics: Mapping[str, float]) -> str:
  """One console line: `count MAE 3.21, RMSE 4.50 (score >= 0.42, chosen on this split)`."""
  if metrics.get("count_mae", -1.0) < 0:
    return "count: n/a (no images)"
  how = "chosen on this split" if metrics.get("count_threshold_chosen") else "given"
  return (f"count MAE {metrics['count_mae']:.2f}, RMSE {metrics['count_rmse']:.2f} "
          f"(score >= {metrics['count_threshold']:.2f}, {how})")
