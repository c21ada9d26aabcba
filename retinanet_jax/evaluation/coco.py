"""COCO box evaluation with pycocotools, robust to what real data does.

Detections enter in the library's form (`[x1, y1, x2, y2]` pixels of the *original* image, contiguous
class indices) and leave as COCO results (`[x, y, w, h]`, dataset category ids); `coco_evaluate` runs
pycocotools' `COCOeval` and returns the 12 standard numbers by name.

What never raises here: no detections at all (AP 0), images without annotations (negatives), a category
without ground truth (pycocotools leaves it out of the mean), a split whose ground truth is empty (every
number is reported as -1, pycocotools' "undefined").
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from typing import Iterable, Mapping, Sequence

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(*, image_ids, boxes, scores, classes, valid, category_ids: Sequence[int],
                       scale=None) -> list[dict]:
  """COCO results (a list of dicts) from padded detections of a batch.

  Args:
    image_ids: int `[B]`.
    boxes: float `[B, D, 4]`, `[x1, y1, x2, y2]` pixels of the network input (or of the original
      image when `scale` is None).
    scores: float `[B, D]`; classes: int `[B, D]` contiguous in `0..K-1`; valid: bool `[B, D]`.
    category_ids: the dataset category id of each contiguous class (`len == K`).
    scale: optional float `[B, 2]`, (y, x) resize factors: boxes are divided by them to get original
      pixels.

  Returns:
    `[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]` for every valid row.
  """
  boxes = np.asarray(boxes, np.float64)
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [B, D, 4], got {boxes.shape}")
  if scale is not None:
    s = np.asarray(scale, np.float64)
    if s.shape != (boxes.shape[0], 2):
      raise ValueError(f"scale must be [B, 2] = {(boxes.shape[0], 2)}, got {s.shape}")
    boxes = boxes / np.stack([s[:, 1], s[:, 0], s[:, 1], s[:, 0]], axis=-1)[:, None, :]
  category_ids = np.asarray(category_ids)
  classes = np.asarray(classes)
  valid = np.asarray(valid, bool)
  if np.any(valid & ((classes < 0) | (classes >= len(category_ids)))):
    raise ValueError(f"classes must be in 0..{len(category_ids) - 1} where valid, got "
                     f"{sorted(set(classes[valid].tolist()))}")
  results = []
  for b, d in zip(*np.nonzero(valid)):
    x1, y1, x2, y2 = boxes[b, d]
    results.append({"image_id": int(np.asarray(image_ids)[b]),
                    "category_id": int(category_ids[classes[b, d]]),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": float(np.asarray(scores)[b, d])})
  return results


def coco_evaluate(ground_truth: Mapping, detections: Iterable[Mapping], *,
                  image_ids: Sequence[int] | None = None, verbose: bool = False) -> dict[str, float]:
  """pycocotools COCOeval (bbox) of `detections` against a COCO-format `ground_truth` dict.

  Args:
    ground_truth: COCO dict with "images", "annotations", "categories" (original pixels).
    detections: COCO results: dicts with image_id, category_id, bbox `[x, y, w, h]`, score.
    image_ids: evaluate only these images (default: every image of the ground truth).
    verbose: let pycocotools print its own summary.

  Returns:
    `{name: value}` for `METRIC_NAMES` (AP in [0, 1]; -1 where pycocotools finds it undefined).
  """
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  detections = list(detections)
  gt = copy.deepcopy(dict(ground_truth))
  gt.setdefault("info", {})
  gt.setdefault("licenses", [])
  for key in ("images", "annotations", "categories"):
    if key not in gt:
      raise ValueError(f"ground truth has no '{key}' list (keys: {sorted(gt)})")
  for ann in gt["annotations"]:  # pycocotools needs area and iscrowd
    ann.setdefault("iscrowd", 0)
    ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
  known_images = {im["id"] for im in gt["images"]}
  unknown = sorted({d["image_id"] for d in detections} - known_images)
  if unknown:
    raise ValueError(f"detections name image ids absent from the ground truth: {unknown[:10]}")
  if not gt["annotations"]:
    logging.warning("COCO evaluation: the ground truth has no annotations; every metric is -1.")
    return {name: -1.0 for name in METRIC_NAMES}
  if not detections:
    logging.warning("COCO evaluation: no detections at all; AP and AR are 0.")
    return {name: 0.0 for name in METRIC_NAMES}

  sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
  with sink:
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}


def format_table(metrics: Mapping[str, float], *, names: Sequence[str] = METRIC_NAMES[:6]) -> str:
  """A two-line plain-text table of the metrics (AP in percent), as printed after each evaluation."""
  head = " | ".join(f"{n:>6}" for n in names)
  values = " | ".join(f"{100 * metrics[n]:6.2f}" if metrics[n] >= 0 else f"{'n/a':>6}" for n in names)
  return f"{head}\n{values}"


def write_metrics(path: str, metrics: Mapping[str, float], **extra) -> None:
  """Writes `{"metrics": ..., **extra}` as JSON (e.g. `workdir/eval_<step>.json`)."""
  with open(path, "w") as f:
    json.dump({"metrics": dict(metrics), **extra}, f, indent=2)
