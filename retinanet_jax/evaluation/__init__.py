"""Evaluation: COCO metrics with pycocotools (`coco.py`) and the `Evaluator` that runs a model over
an evaluation split (`evaluator.py`), used by training, scripts/evaluate.py and the benchmark.

The pycocotools functions are re-exported here (`evaluation.coco_evaluate`, ...) since they need no
JAX; `Evaluator` is imported from `retinanet_jax.evaluation.evaluator`.
"""

from retinanet_jax.evaluation.coco import (BACKENDS, DEFAULT_MAX_DETS, METRIC_NAMES, CocoResult,
                                           coco_evaluate, detections_to_coco, evaluate_detections,
                                           format_report, format_table, metric_names,
                                           write_metrics)

__all__ = ["BACKENDS", "DEFAULT_MAX_DETS", "METRIC_NAMES", "CocoResult", "coco_evaluate",
           "detections_to_coco", "evaluate_detections", "format_report", "format_table",
           "metric_names", "write_metrics"]
