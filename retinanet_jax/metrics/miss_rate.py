"""Pedestrian log-average miss rate MR^-2 (the Caltech / CityPersons protocol, also used for TJU-Ped).

    result = evaluate_miss_rate(ground_truth, detections)   # COCO dict + COCO results
    result.metrics   # {"MR_Reasonable": 0.112, "MR_Small": ..., "MR_Heavy": ..., "MR_All": ...}

The protocol (Dollar, Wojek, Schiele, Perona, "Pedestrian Detection: An Evaluation of the State of the
Art", PAMI 2012, and its Matlab toolbox `dbEval.m` / `bbGt.m`; the subsets and the ignore rules as in
CityPersons' `eval_MR_multisetup.py`, Zhang, Benenson, Schiele, CVPR 2017, whose subsets TJU-Ped
reports too):

1. Subsets (`SUBSETS`), by the full box's height h in pixels and the visibility v (visible area /
   full box area), both ranges closed:

   | subset     | height        | visibility    | CityPersons' name      |
   |------------|---------------|---------------|------------------------|
   | Reasonable | [50, inf]     | [0.65, inf]   | Reasonable             |
   | Small      | [50, 75]      | [0.65, inf]   | Reasonable_small       |
   | Heavy      | [50, inf]     | [0.2, 0.65]   | Reasonable_occ=heavy   |
   | All        | [20, inf]     | [0.2, inf]    | All                    |

   A ground-truth box of the evaluated category outside its subset's ranges, or flagged `ignore`
   (ignore regions, riders, groups, ...), or `iscrowd`, is *ignored*: it is not counted as a
   pedestrian, and a detection that matches it is removed (neither true nor false positive).
2. Detections of the evaluated category; per image the `max_detections` highest-scoring ones (1000),
   then only those whose height is in [h_lo / 1.25, h_hi * 1.25) (the toolbox's "expanded filtering":
   a detection slightly outside the range is neither counted nor punished).
3. Matching per image at IoU 0.5, detections in decreasing score order, greedily: each takes the
   unmatched non-ignored ground truth of highest IoU (>= 0.5; the later one on ties); only if none,
   the ignored one of highest overlap, where the overlap with an ignored box is intersection /
   detection area (an ignored box can absorb any number of detections). Matched to a non-ignored
   box: true positive; to an ignored one: removed; unmatched: false positive.
4. Over the whole set: the remaining detections sorted by score; at each prefix, recall = TP / (number
   of non-ignored ground truths) and FPPI = FP / (number of images). At the 9 reference points
   `FPPI_POINTS` = 10^-2, 10^-1.75, ..., 10^0 the recall is that of the longest prefix with FPPI <=
   the point (0 when there is none), the miss rate 1 - recall; MR^-2 is their geometric mean,
   exp(mean(log(max(miss, 1e-10)))) as in `dbEval.m` (the clip keeps a zero miss rate finite).
   A subset without non-ignored ground truth has MR -1 (undefined).

Where the two reference codes differ, we follow the Caltech toolbox: the reference points are exact
powers of ten (CityPersons' script rounds them to 4 decimals) and a point below the first FPPI gives
recall 0 (CityPersons' script reads index -1 there, i.e. the final recall; this only happens with
fewer than 100 images); the zero-miss clip above (CityPersons' script returns 0 then). Boxes are not
"squarified" to aspect 0.41 (Caltech does, CityPersons does not).

Visibility is read from each annotation's `vis_ratio` (a number in [0, 1]), else from a visible box
(`vis_bbox`, `visible_bbox` or `bbox_vis`, `[x, y, w, h]`): its area over the full box's area. An
annotation with neither counts as fully visible (counted and logged). The evaluated category is
`category` (a name) or, by default, the category named 'pedestrian' or 'person', or the only one;
annotations and detections of other categories are not evaluated (counted and logged).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Mapping, Sequence

import numpy as np

INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Subset:
  """A subset of the protocol: ground truth with height (px) and visibility in these closed ranges."""

  name: str
  height_range: tuple[float, float]
  visibility_range: tuple[float, float]


SUBSETS = (
    Subset("Reasonable", (50.0, INF), (0.65, INF)),
    Subset("Small", (50.0, 75.0), (0.65, INF)),
    Subset("Heavy", (50.0, INF), (0.2, 0.65)),
    Subset("All", (20.0, INF), (0.2, INF)),
)
FPPI_POINTS = tuple(float(10.0 ** e) for e in np.linspace(-2.0, 0.0, 9))
IOU_THRESHOLD = 0.5
HEIGHT_MARGIN = 1.25  # the toolbox's expFilter
MAX_DETECTIONS = 1000  # per image (CityPersons' maxDets)
MISS_FLOOR = 1e-10  # dbEval.m: exp(mean(log(max(1e-10, miss))))
VISIBLE_BOX_FIELDS = ("vis_bbox", "visible_bbox", "bbox_vis")
PEDESTRIAN_NAMES = ("pedestrian", "person")


def metric_name(subset: Subset | str) -> str:
  return f"MR_{subset if isinstance(subset, str) else subset.name}"


def visibility(annotation: Mapping) -> float | None:
  """The annotation's visible fraction (module docstring), or None when it records none."""
  if annotation.get("vis_ratio") is not None:
    value = annotation["vis_ratio"]
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 or value != value:
      raise ValueError(f"annotation id {annotation.get('id')}: vis_ratio must be a number in "
                       f"[0, 1], got {value!r}")
    return float(value)
  for key in VISIBLE_BOX_FIELDS:
    if annotation.get(key) is not None:
      box = annotation[key]
      if (not isinstance(box, (list, tuple)) or len(box) != 4
          or not all(isinstance(v, (int, float)) for v in box) or box[2] < 0 or box[3] < 0):
        raise ValueError(f"annotation id {annotation.get('id')}: {key} must be [x, y, w, h] with "
                         f"w, h >= 0, got {box!r}")
      full = float(annotation["bbox"][2]) * float(annotation["bbox"][3])
      return min(1.0, float(box[2]) * float(box[3]) / full) if full > 0 else 0.0
  return None


def evaluated_category(categories: Sequence[Mapping], name: str = "") -> dict:
  """The category named `name`, or (`name` empty) the one named 'pedestrian' or 'person', or the
  only one."""
  if name:
    found = [c for c in categories if c.get("name") == name]
    if not found:
      raise ValueError(f"miss rate: no category named {name!r}; the categories are "
                       f"{[c.get('name') for c in categories]}")
    return dict(found[0])
  for wanted in PEDESTRIAN_NAMES:
    found = [c for c in categories if str(c.get("name", "")).lower() == wanted]
    if found:
      return dict(found[0])
  if len(categories) == 1:
    return dict(categories[0])
  raise ValueError(f"miss rate: which category is the pedestrian? none is named {PEDESTRIAN_NAMES} "
                   f"among {[c.get('name') for c in categories]}; name it (eval.miss_rate_category)")


def box_overlaps(detections: np.ndarray, truths: np.ndarray, ignored: np.ndarray) -> np.ndarray:
  """Overlaps `[D, G]` of `[x, y, w, h]` boxes: IoU, or intersection / detection area for the
  ignored ground truths (`ignored` bool `[G]`)."""
  d = np.asarray(detections, np.float64).reshape(-1, 4)
  g = np.asarray(truths, np.float64).reshape(-1, 4)
  iw = (np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2])
        - np.maximum(d[:, None, 0], g[None, :, 0]))
  ih = (np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3])
        - np.maximum(d[:, None, 1], g[None, :, 1]))
  inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
  d_area, g_area = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
  union = np.where(ignored[None, :], d_area[:, None], d_area[:, None] + g_area[None, :] - inter)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(inter > 0, inter / union, 0.0)


def match_image(det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_ignored: np.ndarray, *,
                iou_threshold: float = IOU_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
  """Greedy matching of one image (module docstring, step 3).

  Args:
    det_boxes: float `[D, 4]` `[x, y, w, h]`, in decreasing score order.
    gt_boxes: float `[G, 4]` `[x, y, w, h]`; gt_ignored: bool `[G]`.

  Returns:
    `(true_positive, removed)`, bool `[D]` each (neither: a false positive).
  """
  gt_ignored = np.asarray(gt_ignored, bool)
  order = np.argsort(gt_ignored, kind="stable")  # non-ignored first
  boxes, ignored = np.asarray(gt_boxes, np.float64).reshape(-1, 4)[order], gt_ignored[order]
  overlaps = box_overlaps(det_boxes, boxes, ignored)
  taken = np.zeros(len(boxes), bool)
  tp = np.zeros(len(overlaps), bool)
  removed = np.zeros(len(overlaps), bool)
  for d in range(len(overlaps)):
    best, best_g, regular = min(iou_threshold, 1 - 1e-10), -1, False
    for g in range(len(boxes)):
      if taken[g]:
        continue
      if regular and ignored[g]:
        break
      if overlaps[d, g] < best:
        continue
      best, best_g, regular = overlaps[d, g], g, not ignored[g]
    if best_g < 0:
      continue
    if ignored[best_g]:
      removed[d] = True
    else:
      tp[d] = True
      taken[best_g] = True
  return tp, removed


def log_average_miss_rate(scores: np.ndarray, true_positive: np.ndarray, *, num_positives: int,
                          num_images: int, fppi_points: Sequence[float] = FPPI_POINTS
                          ) -> tuple[float, np.ndarray]:
  """MR^-2 and the miss rate at each FPPI point (module docstring, step 4).

  Args:
    scores: float `[N]`, the counted (not removed) detections of the whole set, in image order.
    true_positive: bool `[N]`.
    num_positives: non-ignored ground-truth boxes; num_images: images evaluated.

  Returns:
    `(mr, miss_rates [len(fppi_points)])`; `(-1, -1s)` without positives.
  """
  points = np.asarray(fppi_points, np.float64)
  if num_positives == 0:
    return -1.0, -np.ones(len(points))
  order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
  tp = np.asarray(true_positive, bool)[order]
  recall = np.cumsum(tp) / num_positives
  fppi = np.cumsum(~tp) / num_images
  last = np.searchsorted(fppi, points, side="right") - 1  # longest prefix with fppi <= point
  recall_at = np.where(last >= 0, recall[np.maximum(last, 0)] if len(recall) else 0.0, 0.0)
  miss = 1.0 - recall_at
  return float(np.exp(np.mean(np.log(np.maximum(miss, MISS_FLOOR))))), miss


@dataclasses.dataclass(frozen=True)
class MissRateResult:
  """What `evaluate_miss_rate` gives.

  Attributes:
    metrics: `{"MR_<subset>": MR^-2}` in [0, 1] (lower is better; -1 undefined).
    per_subset: per subset: name, ranges, num_gt (non-ignored), num_ignored, miss rates at the
      FPPI points.
    category: the evaluated category (id, name).
    num_images: images evaluated.
  """

  metrics: dict
  per_subset: list
  category: dict
  num_images: int

  def to_json(self) -> dict:
    """The fields written beside the metrics in `eval_<step>.json`."""
    return {"metric": "miss_rate", "category": self.category, "num_images": self.num_images,
            "fppi_points": list(FPPI_POINTS), "per_subset": self.per_subset}


def evaluate_miss_rate(ground_truth: Mapping, detections: Iterable[Mapping], *, category: str = "",
                       subsets: Sequence[Subset] = SUBSETS,
                       max_detections: int = MAX_DETECTIONS) -> MissRateResult:
  """MR^-2 of COCO results `detections` on the COCO dict `ground_truth`, per subset (module
  docstring). Every image of the ground truth is evaluated (FPPI counts them all)."""
  for key in ("images", "annotations", "categories"):
    if key not in ground_truth:
      raise ValueError(f"ground truth has no '{key}' list (keys: {sorted(ground_truth)})")
  cat = evaluated_category(ground_truth["categories"], category)
  cat_id = int(cat["id"])
  image_ids = sorted(int(im["id"]) for im in ground_truth["images"])  # CityPersons: sorted ids
  known = set(image_ids)
  detections = list(detections)
  unknown = sorted({int(d["image_id"]) for d in detections} - known)
  if unknown:
    raise ValueError(f"detections name image ids absent from the ground truth: {unknown[:10]}")

  truths = {i: [] for i in image_ids}
  other, no_visibility = 0, 0
  for ann in ground_truth["annotations"]:
    if int(ann["category_id"]) != cat_id:
      other += 1
      continue
    if int(ann["image_id"]) not in known:
      raise ValueError(f"annotation id {ann.get('id')} names image id {ann['image_id']}, absent "
                       f"from the images")
    vis = visibility(ann)
    if vis is None:
      no_visibility += 1
      vis = 1.0
    flagged = bool(ann.get("ignore", 0)) or bool(ann.get("iscrowd", 0))
    truths[int(ann["image_id"])].append((*map(float, ann["bbox"]), vis, flagged))
  if other:
    logging.info("miss rate: %d annotations of other categories than %r are not evaluated", other,
                 cat.get("name"))
  if no_visibility:
    logging.warning("miss rate: %d of the %r annotations record no visibility (vis_ratio or a "
                    "visible box); they count as fully visible", no_visibility, cat.get("name"))
  found = {i: [] for i in image_ids}
  skipped = 0
  for d in detections:
    if int(d["category_id"]) != cat_id:
      skipped += 1
      continue
    found[int(d["image_id"])].append((*map(float, d["bbox"]), float(d["score"])))
  if skipped:
    logging.info("miss rate: %d detections of other categories than %r are not evaluated",
                 skipped, cat.get("name"))

  metrics, per_subset = {}, []
  for subset in subsets:
    (h_lo, h_hi), (v_lo, v_hi) = subset.height_range, subset.visibility_range
    scores, tps = [], []
    positives = ignored_count = 0
    for image_id in image_ids:
      gt = np.asarray(truths[image_id], np.float64).reshape(-1, 6)
      ignored = ((gt[:, 5] > 0) | (gt[:, 3] < h_lo) | (gt[:, 3] > h_hi) | (gt[:, 4] < v_lo)
                 | (gt[:, 4] > v_hi))
      positives += int(np.sum(~ignored))
      ignored_count += int(np.sum(ignored))
      dt = np.asarray(found[image_id], np.float64).reshape(-1, 5)
      dt = dt[np.argsort(-dt[:, 4], kind="mergesort")][:max_detections]
      dt = dt[(dt[:, 3] >= h_lo / HEIGHT_MARGIN) & (dt[:, 3] < h_hi * HEIGHT_MARGIN)]
      tp, removed = match_image(dt[:, :4], gt[:, :4], ignored)
      scores.append(dt[~removed, 4])
      tps.append(tp[~removed])
    mr, miss = log_average_miss_rate(np.concatenate(scores), np.concatenate(tps),
                                     num_positives=positives, num_images=len(image_ids))
    metrics[metric_name(subset)] = mr
    per_subset.append({"name": subset.name, "height_range": list(subset.height_range),
                       "visibility_range": list(subset.visibility_range), "num_gt": positives,
                       "num_ignored": ignored_count, "MR": mr, "miss_rates": miss.tolist()})
  return MissRateResult(metrics, per_subset, {"id": cat_id, "name": cat.get("name", "")},
                        len(image_ids))


def format_report(result: MissRateResult) -> str:
  """The MR^-2 table (percent, lower is better), as printed after each evaluation."""
  names = list(result.metrics)
  widths = [max(8, len(n)) for n in names]
  head = " | ".join(f"{n:>{w}}" for n, w in zip(names, widths))
  values = " | ".join(f"{100 * result.metrics[n]:{w}.2f}" if result.metrics[n] >= 0 else
                      f"{'n/a':>{w}}" for n, w in zip(names, widths))
  counts = ", ".join(f"{s['name']} {s['num_gt']}" for s in result.per_subset)
  return (f"{head}\n{values}\n(log-average miss rate MR^-2 in %, FPPI 1e-2..1e0, IoU 0.5; category "
          f"{result.category['name']!r} (id {result.category['id']}); {result.num_images} images; "
          f"pedestrians per subset: {counts})")
