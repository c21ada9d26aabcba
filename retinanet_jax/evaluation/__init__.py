"""Evaluation: COCO metrics with pycocotools (`coco.py`) and the `Evaluator` that runs a model over
an evaluation split (`evaluator.py`), used by training, scripts/evaluate.py and the benchmark.

The pycocotools functions are re-exported here (`evaluation.coco_evaluate`, ...) since they need no
JAX; `Evaluator` is imported from `retinanet_jax.evaluation.evaluator`.
"""

from retinanet_jax.evaluation.coco import (METRIC_NAMES, coco_evaluate, detections_to_coco,
                                           format_table, write_metrics)

__all__ = ["METRIC_NAMES", "coco_evaluate", "detections_to_coco", "format_table", "write_metrics"]
