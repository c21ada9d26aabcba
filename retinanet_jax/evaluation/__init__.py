"""Evaluation: a model run over datasets and scored. `evaluator.Evaluator` runs a model over an
evaluation split (training's evaluations, scripts/evaluate.py, the benchmark), `evaluator.evaluate_saved`
evaluates a saved model, `multi_domain` one model on several COCO-format folders (COCO-O's domains).
The scores themselves are `retinanet_jax.metrics` (COCO AP, miss rate, counting), whose COCO
functions are re-exported here (`evaluation.coco_evaluate`, ...) with `format_report`.
"""

from retinanet_jax.metrics import coco as _coco
from retinanet_jax.metrics import miss_rate as _miss_rate
from retinanet_jax.metrics.coco import (BACKENDS, DEFAULT_MAX_DETS, METRIC_NAMES, CocoResult,
                                        coco_evaluate, detections_to_coco, evaluate_detections,
                                        format_table, metric_names, write_metrics)
from retinanet_jax.metrics.miss_rate import MissRateResult, evaluate_miss_rate


def format_report(result) -> str:
  """What evaluations print: `coco.format_report` or `miss_rate.format_report` by the result."""
  if isinstance(result, _miss_rate.MissRateResult):
    return _miss_rate.format_report(result)
  return _coco.format_report(result)


__all__ = ["BACKENDS", "DEFAULT_MAX_DETS", "METRIC_NAMES", "CocoResult", "MissRateResult",
           "coco_evaluate", "detections_to_coco", "evaluate_detections", "evaluate_miss_rate",
           "format_report", "format_table", "metric_names", "write_metrics"]
