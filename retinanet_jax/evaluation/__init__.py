"""Evaluation: COCO metrics with pycocotools (`coco.py`), the pedestrian log-average miss rate
(`miss_rate.py`) and the `Evaluator` that runs a model over an evaluation split (`evaluator.py`),
used by training, scripts/evaluate.py and the benchmark.

The pycocotools functions are re-exported here (`evaluation.coco_evaluate`, ...) since they need no
JAX; `Evaluator` is imported from `retinanet_jax.evaluation.evaluator`.
"""

from retinanet_jax.evaluation import coco as _coco
from retinanet_jax.evaluation import miss_rate as _miss_rate
from retinanet_jax.evaluation.coco import (BACKENDS, DEFAULT_MAX_DETS, METRIC_NAMES, CocoResult,
                                           coco_evaluate, detections_to_coco, evaluate_detections,
                                           format_table, metric_names, write_metrics)
from retinanet_jax.evaluation.miss_rate import MissRateResult, evaluate_miss_rate


def format_report(result) -> str:
  """What evaluations print: `coco.format_report` or `miss_rate.format_report` by the result."""
  if isinstance(result, _miss_rate.MissRateResult):
    return _miss_rate.format_report(result)
  return _coco.format_report(result)


__all__ = ["BACKENDS", "DEFAULT_MAX_DETS", "METRIC_NAMES", "CocoResult", "MissRateResult",
           "coco_evaluate", "detections_to_coco", "evaluate_detections", "evaluate_miss_rate",
           "format_report", "format_table", "metric_names", "write_metrics"]
