"""COCO box evaluation with pycocotools, robust to what real data does.

Detections enter in the library's form (`[x1, y1, x2, y2]` pixels of the *original* image, contiguous
class indices) and leave as COCO results (`[x, y, w, h]`, dataset category ids); `coco_evaluate` runs
pycocotools' `COCOeval` and returns the 12 standard numbers by name.

What never raises here: no detections at all (AP 0), images without annotations (negatives), a category
without ground truth (pycocotools leaves it out of the mean), a split whose ground truth is empty (every
number is reported as -1, pycocotools' "undefined").

maxDets. `evaluate_detections(..., max_dets=(m_1, ..., m_k))` evaluates up to `M = m_k` detections per
image and category (pycocotools' `params.maxDets`; increasing positive integers, COCO's (1, 10, 100) by
default) and computes the summary itself from COCOeval's accumulated `eval["precision"]`
(`[T, R, K, A, M]`: IoU thresholds, recall thresholds, categories, area ranges, maxDets) and
`eval["recall"]` (`[T, K, A, M]`), because pycocotools' `summarize()` reads AP at a literal 100 and
AP50 ... ARl at `maxDets[2]`, whatever `maxDets` holds (cocoapi#558). The summary (`metric_names`):
AP, AP50, AP75, APs, APm, APl and ARs, ARm, ARl at `M`, and `AR<m>` (recall at `m` detections) for
every `m` of `max_dets`. A name without '@' is at maxDets 100, COCO's standard; at another `M` the
AP and area-AR names carry it: `max_dets=(1, 10, 100, 300)` gives AP@300, AP50@300, ..., AR1, AR10,
AR100, AR300, ARs@300, ARm@300, ARl@300. With the default this is exactly pycocotools' 12 `stats`
and their usual names (`METRIC_NAMES`).

Per-category AP. Every evaluation also gives each category's AP, AP50, AP75 and AR at `M` (area
'all'), averaged over IoU and recall thresholds as pycocotools averages the mean AP (entries of -1
left out; -1 when the category has no ground truth), with its id, name and ground-truth count.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
from typing import Iterable, Mapping, Sequence

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
DEFAULT_MAX_DETS = (1, 10, 100)
# Evaluation engines with pycocotools' COCOeval interface (see `evaluate_detections`):
# 'faster_coco_eval' is the optional package `faster-coco-eval` (C++ evaluateImg and accumulate).
BACKENDS = ("pycocotools", "faster_coco_eval")
FASTER_COCO_EVAL_PIP = "pip install 'faster-coco-eval==1.8.0'"


def check_max_dets(max_dets: Sequence[int]) -> tuple[int, ...]:
  """`max_dets` as a tuple after checking it: non-empty, positive integers, strictly increasing."""
  values = tuple(max_dets)
  if (not values or not all(isinstance(m, (int, np.integer)) and not isinstance(m, bool)
                            for m in values)
      or any(m < 1 for m in values) or any(a >= b for a, b in zip(values, values[1:]))):
    raise ValueError(f"max_dets must be strictly increasing positive integers, e.g. "
                     f"{DEFAULT_MAX_DETS}; got {max_dets!r}")
  return tuple(int(m) for m in values)


def metric_names(max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> tuple[str, ...]:
  """The summary's names for `max_dets` (module docstring): `METRIC_NAMES` for (1, 10, 100)."""
  max_dets = check_max_dets(max_dets)
  at = "" if max_dets[-1] == 100 else f"@{max_dets[-1]}"
  return (*(f"{n}{at}" for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")),
          *(f"AR{m}" for m in max_dets), *(f"{n}{at}" for n in ("ARs", "ARm", "ARl")))


def _mean_defined(values: np.ndarray) -> float:
  """pycocotools' mean: of the entries > -1; -1 when there are none."""
  defined = values[values > -1]
  return float(np.mean(defined)) if defined.size else -1.0


def summarize(precision: np.ndarray, recall: np.ndarray, *, max_dets: Sequence[int],
              iou_thresholds: np.ndarray) -> dict[str, float]:
  """The summary (`metric_names(max_dets)`) from COCOeval's accumulated arrays.

  Args:
    precision: float `[T, R, K, A, M]` (`COCOeval.eval["precision"]`; -1 where undefined).
    recall: float `[T, K, A, M]` (`COCOeval.eval["recall"]`).
    max_dets: the `M` maxDets the arrays were accumulated with (`params.maxDets`).
    iou_thresholds: float `[T]` (`params.iouThrs`); must hold 0.5 and 0.75.
    The `A` area ranges are pycocotools' all, small, medium, large, in that order.

  Returns:
    `{name: value}`: each a mean over the defined entries, as pycocotools' `_summarize` computes
    it, at the maxDets that the name says.
  """
  max_dets = check_max_dets(max_dets)
  if precision.shape[-1] != len(max_dets) or recall.shape[-1] != len(max_dets):
    raise ValueError(f"precision {precision.shape} and recall {recall.shape} must end in "
                     f"len(max_dets) = {len(max_dets)}")
  iou = {t: int(np.argmin(np.abs(np.asarray(iou_thresholds) - t))) for t in (0.5, 0.75)}
  names = metric_names(max_dets)
  last = len(max_dets) - 1
  values = [
      _mean_defined(precision[:, :, :, 0, last]),
      _mean_defined(precision[iou[0.5], :, :, 0, last]),
      _mean_defined(precision[iou[0.75], :, :, 0, last]),
      *(_mean_defined(precision[:, :, :, a, last]) for a in (1, 2, 3)),
      *(_mean_defined(recall[:, :, 0, m]) for m in range(len(max_dets))),
      *(_mean_defined(recall[:, :, a, last]) for a in (1, 2, 3)),
  ]
  return dict(zip(names, values))


def per_category(precision: np.ndarray, recall: np.ndarray, *, max_dets: Sequence[int],
                 iou_thresholds: np.ndarray, categories: Sequence[Mapping],
                 num_ground_truth: Mapping[int, int]) -> list[dict]:
  """Each category's AP, AP50, AP75 and AR at `max_dets[-1]`, area 'all' (arrays as `summarize`'s;
  `categories` in the order of the `K` axis). AP of category k is pycocotools' mean AP restricted to
  k: the mean of `precision[:, :, k, 0, -1]` over its entries > -1 (-1 when it has no ground truth).

  Returns:
    `[{"id", "name", "num_gt", "AP", "AP50", "AP75", "AR<M>"}]`, one per category, in `categories`'
    order (values in [0, 1], -1 undefined).
  """
  max_dets = check_max_dets(max_dets)
  iou = {t: int(np.argmin(np.abs(np.asarray(iou_thresholds) - t))) for t in (0.5, 0.75)}
  out = []
  for k, category in enumerate(categories):
    out.append({"id": int(category["id"]), "name": str(category.get("name", "")),
                "num_gt": int(num_ground_truth.get(int(category["id"]), 0)),
                "AP": _mean_defined(precision[:, :, k, 0, -1]),
                "AP50": _mean_defined(precision[iou[0.5], :, k, 0, -1]),
                "AP75": _mean_defined(precision[iou[0.75], :, k, 0, -1]),
                f"AR{max_dets[-1]}": _mean_defined(recall[:, k, 0, -1])})
  return out


@dataclasses.dataclass(frozen=True)
class CocoResult:
  """What one COCO evaluation gives (`evaluate_detections`).

  Attributes:
    metrics: the summary, `{name: value}` for `metric_names(max_dets)`.
    per_category: `per_category`'s list, one entry per category of the ground truth, by id.
    max_dets: the maxDets used.
    backend: the engine that matched detections to ground truth ('pycocotools', ...).
  """

  metrics: dict
  per_category: list
  max_dets: tuple
  backend: str

  def to_json(self) -> dict:
    """The fields written beside the metrics in `eval_<step>.json`."""
    return {"metric": "coco", "max_dets": list(self.max_dets), "backend": self.backend,
            "per_category": [dict(c) for c in self.per_category]}


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
                  image_ids: Sequence[int] | None = None, verbose: bool = False,
                  max_dets: Sequence[int] = DEFAULT_MAX_DETS,
                  backend: str = "pycocotools") -> dict[str, float]:
  """The summary metrics of `evaluate_detections` (same arguments): `{name: value}` for
  `metric_names(max_dets)` (`METRIC_NAMES` by default; AP in [0, 1]; -1 where undefined)."""
  return evaluate_detections(ground_truth, detections, image_ids=image_ids, verbose=verbose,
                             max_dets=max_dets, backend=backend).metrics


def evaluate_detections(ground_truth: Mapping, detections: Iterable[Mapping], *,
                        image_ids: Sequence[int] | None = None, verbose: bool = False,
                        max_dets: Sequence[int] = DEFAULT_MAX_DETS,
                        backend: str = "pycocotools") -> CocoResult:
  """COCOeval (bbox) of `detections` against a COCO-format `ground_truth` dict.

  Args:
    ground_truth: COCO dict with "images", "annotations", "categories" (original pixels).
    detections: COCO results: dicts with image_id, category_id, bbox `[x, y, w, h]`, score.
    image_ids: evaluate only these images (default: every image of the ground truth).
    verbose: let the engine print its progress, and print the summary.
    max_dets: pycocotools' maxDets (module docstring).
    backend: one of `BACKENDS`.

  Returns:
    A `CocoResult`: the summary (module docstring), AP per category, the maxDets and the backend.
  """
  max_dets = check_max_dets(max_dets)
  if backend not in BACKENDS:
    raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
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
  evaluated = known_images if image_ids is None else {int(i) for i in image_ids}
  categories = sorted(gt["categories"], key=lambda c: c["id"])
  num_gt: dict[int, int] = {}
  for ann in gt["annotations"]:
    if ann["image_id"] in evaluated and not ann["iscrowd"]:
      num_gt[int(ann["category_id"])] = num_gt.get(int(ann["category_id"]), 0) + 1
  names = metric_names(max_dets)

  def constant(value: float) -> CocoResult:
    cats = [{"id": int(c["id"]), "name": str(c.get("name", "")),
             "num_gt": num_gt.get(int(c["id"]), 0),
             **{k: (value if num_gt.get(int(c["id"]), 0) else -1.0)
                for k in ("AP", "AP50", "AP75", f"AR{max_dets[-1]}")}} for c in categories]
    return CocoResult({name: value for name in names}, cats, max_dets, backend)

  if not gt["annotations"]:
    logging.warning("COCO evaluation: the ground truth has no annotations; every metric is -1.")
    return constant(-1.0)
  if not detections:
    logging.warning("COCO evaluation: no detections at all; AP and AR are 0.")
    return constant(0.0)

  sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
  with sink:
    evaluator = _cocoeval(gt, detections, backend=backend)
    evaluator.params.maxDets = list(max_dets)
    evaluator.params.catIds = [int(c["id"]) for c in categories]
    if image_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
  arrays = dict(precision=np.asarray(evaluator.eval["precision"]),
                recall=np.asarray(evaluator.eval["recall"]), max_dets=max_dets,
                iou_thresholds=np.asarray(evaluator.params.iouThrs))
  metrics = summarize(**arrays)
  if verbose:
    print("\n".join(f"{name:>10} = {value:.3f}" for name, value in metrics.items()))
  return CocoResult(metrics, per_category(**arrays, categories=categories, num_ground_truth=num_gt),
                    max_dets, backend)


def _cocoeval(gt: dict, detections: list[dict], *, backend: str):
  """An engine's COCOeval (bbox) of `detections` on the ground truth `gt` (not yet evaluated).

  Both engines take the same params (maxDets, catIds, imgIds) and leave the same
  `eval["precision"]` `[T, R, K, A, M]` and `eval["recall"]` `[T, K, A, M]` (area ranges all,
  small, medium, large), which `summarize` reads.
  """
  if backend == "faster_coco_eval":
    try:
      import faster_coco_eval  # the optional engine (extra 'faster_eval')  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError(f"eval.backend='faster_coco_eval' needs the optional package "
                        f"faster-coco-eval, which is not installed: {FASTER_COCO_EVAL_PIP} (or, in this "
                        f"repository, pip install -e '.[faster_eval]'); or use "
                        f"eval.backend='pycocotools'") from None
    quiet = lambda *args, **kwargs: None  # its progress goes to logging.INFO otherwise
    coco_gt = faster_coco_eval.COCO(gt, print_function=quiet)
    coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
    return faster_coco_eval.COCOeval_faster(coco_gt, coco_dt, iouType="bbox",
                                            print_function=quiet)
  from pycocotools.coco import COCO  # imports matplotlib: only when evaluating  # pylint: disable=import-outside-toplevel
  from pycocotools.cocoeval import COCOeval  # as above  # pylint: disable=import-outside-toplevel
  coco_gt = COCO()
  coco_gt.dataset = gt
  coco_gt.createIndex()
  coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
  return COCOeval(coco_gt, coco_dt, iouType="bbox")


def format_table(metrics: Mapping[str, float], *, names: Sequence[str] | None = None) -> str:
  """A two-line plain-text table of the metrics (AP in percent), as printed after each evaluation;
  `names` default: the AP names of the summary (AP ... APl, or AP@300 ... APl@300)."""
  if names is None:
    names = [n for n in metrics if n.startswith("AP")][:6]
  widths = [max(6, len(n)) for n in names]
  head = " | ".join(f"{n:>{w}}" for n, w in zip(names, widths))
  values = " | ".join(f"{100 * metrics[n]:{w}.2f}" if metrics[n] >= 0 else f"{'n/a':>{w}}"
                      for n, w in zip(names, widths))
  return f"{head}\n{values}"


def format_report(result: CocoResult, *, max_categories: int = 20) -> str:
  """The summary table, the maxDets it is at, and AP per category when there are at most
  `max_categories` (else a line saying where to find them): what evaluations print."""
  lines = [format_table(result.metrics),
           f"(AP at maxDets={result.max_dets[-1]} detections per image and category; maxDets "
           f"{tuple(result.max_dets)}; {result.backend})"]
  cats = result.per_category
  if len(cats) <= max_categories:
    ar = f"AR{result.max_dets[-1]}"
    width = max([len(c["name"]) for c in cats] + [8])
    lines.append(f"{'id':>5} {'category':<{width}} {'#gt':>6} | {'AP':>6} | {'AP50':>6} | "
                 f"{'AP75':>6} | {ar:>6}")
    for c in cats:
      values = " | ".join(f"{100 * c[k]:6.2f}" if c[k] >= 0 else f"{'n/a':>6}"
                          for k in ("AP", "AP50", "AP75", ar))
      lines.append(f"{c['id']:>5} {c['name']:<{width}} {c['num_gt']:>6} | {values}")
  else:
    lines.append(f"(AP of each of the {len(cats)} categories: 'per_category' in the JSON)")
  return "\n".join(lines)


def write_metrics(path: str, metrics: Mapping[str, float], **extra) -> None:
  """Writes `{"metrics": ..., **extra}` as JSON (e.g. `workdir/eval_<step>.json`)."""
  with open(path, "w") as f:
    json.dump({"metrics": dict(metrics), **extra}, f, indent=2)
