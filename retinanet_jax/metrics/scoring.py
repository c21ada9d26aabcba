"""One call that scores COCO results against a COCO-format ground truth, as every evaluation does:
COCO AP (with counting) or the pedestrian miss rate.

    result = score(ground_truth, detections, metric="coco", max_dets=(1, 10, 100))
    result.metrics["AP"], result.metrics["count_mae"]

The evaluator of a model (retinanet_jax/evaluation/evaluator.py) and `scripts/evaluate.py
--detections=FILE` (no model: a results file) both call it, so a results file re-scored gives the
numbers of the run that wrote it.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from retinanet_jax.metrics import coco, counting, miss_rate

METRICS = ("coco", "miss_rate")


def score(ground_truth: Mapping, detections: Iterable[Mapping], *, metric: str = "coco",
          max_dets: Sequence[int] = coco.DEFAULT_MAX_DETS, backend: str = "pycocotools",
          miss_rate_category: str = "", count_threshold: float | None = None):
  """The evaluation of `detections` (COCO results: `image_id`, `category_id`, `bbox` `[x, y, w, h]`
  in original pixels, `score`) against `ground_truth` (a COCO-format dict).

  Returns a `coco.CocoResult` (metric 'coco': the summary at `max_dets` with the counting metrics
  `count_mae`, `count_rmse`, `count_threshold`, `count_threshold_chosen` added, AP per category) or
  a `miss_rate.MissRateResult` (metric 'miss_rate', of the category `miss_rate_category`)."""
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  detections = list(detections)
  if metric == "miss_rate":
    return miss_rate.evaluate_miss_rate(ground_truth, detections, category=miss_rate_category)
  result = coco.evaluate_detections(ground_truth, detections, max_dets=max_dets, backend=backend)
  result.metrics.update(counting.count_metrics(ground_truth, detections, threshold=count_threshold))
  return result
