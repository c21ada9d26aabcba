"""COCO results files: the detections an evaluation writes, a submission to the COCO evaluation
server, and a file someone hands us to score.

A results file is a JSON list of `{"image_id": int, "category_id": int, "bbox": [x, y, w, h],
"score": float}` in the original pixels of each image, with the dataset's category ids (COCO's
"results format"; pycocotools' `COCO.loadRes` reads it). Extra keys (`category_name`, `file_name`,
...) are allowed and ignored.

The COCO evaluation server wants `detections_<testset>_<algorithm>_results.json`, zipped, with
detections of every image of the test set (`submission_name`).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Iterable, Mapping

from retinanet_jax.runtime import errors

MAX_LISTED = 10


class ResultsFileError(errors.KnownError, ValueError):
  """A results file that cannot be scored; the message lists every problem (the first
  `MAX_LISTED` of each kind, with their count). Scripts exit with `errors.DATA` (3)."""

  exit_code = errors.DATA


def submission_name(testset: str, algorithm: str) -> str:
  """`detections_<testset>_<algorithm>_results.json` (COCO's upload naming, e.g.
  `detections_test-dev2017_retinanet_results.json`); names made of letters, digits, '-', '.'."""
  for what, value in (("testset", testset), ("algorithm", algorithm)):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", value or ""):
      raise ValueError(f"{what} must be letters, digits, '-' or '.', got {value!r} (the server "
                       f"reads the file name as detections_<testset>_<algorithm>_results.json)")
  return f"detections_{testset}_{algorithm}_results.json"


def write_results(path: str, detections: Iterable[Mapping]) -> None:
  """Writes `detections` as a results file; an existing file is never replaced (FileExistsError)."""
  with open(path, "x") as f:
    json.dump([dict(d) for d in detections], f)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_results(results, *, ground_truth: Mapping, where: str) -> list[dict]:
  """`results` (a parsed results file) as a list of dicts, after checking every entry against
  `ground_truth` (a COCO-format dict): a list of objects with an integer `image_id` of the ground
  truth, an integer `category_id` of its categories, a `bbox` of 4 finite numbers with width and
  height >= 0, a finite `score`. Raises `ResultsFileError` listing every problem, by kind."""
  if not isinstance(results, list):
    raise ResultsFileError(f"{where}: a COCO results file is a JSON list of detections, got a "
                           f"{type(results).__name__}")
  image_ids = {int(im["id"]) for im in ground_truth.get("images", [])}
  category_ids = {int(c["id"]) for c in ground_truth.get("categories", [])}
  problems: dict[str, list[str]] = {}

  def add(kind: str, text: str) -> None:
    problems.setdefault(kind, []).append(text)

  for i, d in enumerate(results):
    if not isinstance(d, dict):
      add("not an object", f"entry {i}")
      continue
    missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in d]
    if missing:
      add("missing keys", f"entry {i}: {missing}")
      continue
    image_id, category_id, bbox = d["image_id"], d["category_id"], d["bbox"]
    if not isinstance(image_id, int) or isinstance(image_id, bool):
      add("image_id not an integer", f"entry {i}: {image_id!r}")
    elif image_id not in image_ids:
      add("image_id not in the ground truth", f"entry {i}: {image_id}")
    if not isinstance(category_id, int) or isinstance(category_id, bool):
      add("category_id not an integer", f"entry {i}: {category_id!r}")
    elif category_id not in category_ids:
      add("category_id not in the ground truth's categories", f"entry {i}: {category_id}")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite(v) for v in bbox)):
      add("bbox not 4 finite numbers", f"entry {i}: {bbox!r}")
    elif bbox[2] < 0 or bbox[3] < 0:
      add("bbox with a negative width or height", f"entry {i}: {bbox}")
    if not _finite(d["score"]):
      add("score not a finite number", f"entry {i}: {d['score']!r}")
  if problems:
    lines = [f"{where}: {sum(len(v) for v in problems.values())} problem(s) in {len(results)} "
             f"detections; nothing was scored:"]
    for kind, items in problems.items():
      shown = "; ".join(items[:MAX_LISTED]) + (" ..." if len(items) > MAX_LISTED else "")
      lines.append(f"  {kind} ({len(items)}): {shown}")
    raise ResultsFileError("\n".join(lines))
  return results


def read_results(path: str, *, ground_truth: Mapping) -> list[dict]:
  """The checked detections of the results file `path` (`check_results`); a file that is not
  JSON is a `ResultsFileError` naming it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no results file {path}")
  try:
    with open(path) as f:
      results = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ResultsFileError(f"{path}: not JSON ({e})") from None
  return check_results(results, ground_truth=ground_truth, where=path)
