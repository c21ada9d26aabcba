"""One-pass validation of COCO-format annotation files and their images.

`validate(splits, box_tolerance=...)` checks every split completely (the JSON, then every image file,
read and decoded on a thread pool) and returns a `Validation`: the parsed images and boxes plus a
`Report` with every problem found, each a `Problem` of one `ProblemKind` naming its split, image id,
annotation id and file name where they apply. Nothing stops at the first problem: a user fixes the
whole file in one round.

Problem kinds have a severity:
* FATAL (the dataset is not written): unreadable or malformed JSON, JSON that is not COCO (a list at
  the top level, `images` not a list, no categories), a missing or ill-typed required field,
  duplicate image / annotation / category ids, one file name under two image ids, image ids outside
  int32, splits whose categories differ.
* SKIP (the image or annotation is left out and counted; `strict=True` makes these fatal too): a
  missing, undecodable or wrongly-sized image; an annotation on an unknown image or category, with a
  bbox that is not 4 finite numbers, with non-positive width or height, outside the image by more
  than `box_tolerance` pixels, or with `iscrowd` not 0/1.
* WARNING (reported, nothing left out): two categories with the same name.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import io
import json
import math
import os
from collections.abc import Callable, Mapping

from etils import epath
from PIL import Image

_INT32_MAX = 2**31 - 1
REPORT_FORMAT = "retinanet_jax prepare_dataset report v1"


class Severity(enum.Enum):
  FATAL = "fatal"
  SKIP = "skip"
  WARNING = "warning"


class ProblemKind(enum.Enum):
  """Each kind: (severity, what it means). The value's name is the key in prepare_report.json."""

  UNREADABLE_ANNOTATIONS = (Severity.FATAL, "annotations file cannot be read")
  MALFORMED_JSON = (Severity.FATAL, "annotations file is not valid JSON")
  NOT_COCO = (Severity.FATAL, "valid JSON but not a COCO-format object")
  MISSING_OR_INVALID_FIELD = (Severity.FATAL, "required field missing or of the wrong type")
  DUPLICATE_IMAGE_ID = (Severity.FATAL, "image id listed more than once")
  DUPLICATE_ANNOTATION_ID = (Severity.FATAL, "annotation id listed more than once")
  DUPLICATE_CATEGORY_ID = (Severity.FATAL, "category id listed more than once")
  DUPLICATE_FILE_NAME = (Severity.FATAL, "one file name under more than one image id")
  IMAGE_ID_OUT_OF_RANGE = (Severity.FATAL, "image id outside 0..2**31-1 (batches carry int32)")
  CATEGORIES_DIFFER = (Severity.FATAL, "splits have different categories")
  MISSING_IMAGE = (Severity.SKIP, "image file missing or unreadable")
  UNDECODABLE_IMAGE = (Severity.SKIP, "image file is not a decodable image")
  IMAGE_SIZE_MISMATCH = (Severity.SKIP, "decoded size differs from the record's width x height")
  UNKNOWN_IMAGE_ID = (Severity.SKIP, "annotation's image_id has no image entry")
  UNKNOWN_CATEGORY_ID = (Severity.SKIP, "annotation's category_id has no category entry")
  INVALID_BBOX = (Severity.SKIP, "bbox is not 4 finite numbers [x, y, w, h]")
  EMPTY_BOX = (Severity.SKIP, "box with non-positive width or height")
  BOX_OUTSIDE_IMAGE = (Severity.SKIP, "box outside the image by more than box_tolerance")
  INVALID_ISCROWD = (Severity.SKIP, "iscrowd is not 0 or 1")
  # Readers of other annotation formats (annotation_readers.py: SKU-110K CSV, CARPK text files).
  MALFORMED_ROW = (Severity.SKIP, "annotation row with the wrong number of columns or a "
                   "non-numeric or inconsistent value")
  UNKNOWN_IMAGE_FILE = (Severity.SKIP, "annotation names an image that is not in the image folder")
  DUPLICATE_CATEGORY_NAME = (Severity.WARNING, "two categories share a name")

  @property
  def severity(self) -> Severity:
    return self.value[0]

  @property
  def description(self) -> str:
    return self.value[1]

  @property
  def key(self) -> str:
    return self.name.lower()


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem; the ids say where (None where they do not apply)."""

  kind: ProblemKind
  message: str
  split: str | None = None
  image_id: int | None = None
  annotation_id: int | None = None
  file_name: str | None = None
  category_id: int | None = None

  def to_json(self) -> dict:
    row = {k: v for k, v in dataclasses.asdict(self).items() if k != "kind" and v is not None}
    return row


@dataclasses.dataclass
class Report:
  """Every problem of a prepare run and, once written, what the dataset holds."""

  problems: list[Problem] = dataclasses.field(default_factory=list)
  images: dict[str, int] = dataclasses.field(default_factory=dict)  # kept, per split
  annotations: dict[str, int] = dataclasses.field(default_factory=dict)
  strict: bool = False
  # split -> (largest number of boxes on one kept image, that image's id); set by `validate`.
  largest_box_count: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

  def add(self, kind: ProblemKind, message: str, **ids) -> None:
    self.problems.append(Problem(kind, message, **ids))

  def severity(self, kind: ProblemKind) -> Severity:
    if self.strict and kind.severity == Severity.SKIP:
      return Severity.FATAL
    return kind.severity

  def by_kind(self) -> dict[ProblemKind, list[Problem]]:
    grouped = collections.defaultdict(list)
    for p in self.problems:
      grouped[p.kind].append(p)
    return {kind: grouped[kind] for kind in ProblemKind if kind in grouped}

  @property
  def fatal(self) -> list[Problem]:
    return [p for p in self.problems if self.severity(p.kind) == Severity.FATAL]

  @property
  def skipped_images(self) -> list[str]:
    return [p.message for p in self.problems
            if p.kind.severity == Severity.SKIP and p.annotation_id is None]

  @property
  def skipped_annotations(self) -> list[str]:
    return [p.message for p in self.problems
            if p.kind.severity == Severity.SKIP and p.annotation_id is not None]

  def summary(self, *, max_listed: int = 10) -> str:
    """Counts per split, then every kind with its count and its first `max_listed` problems."""
    lines = [f"{split}: {self.images[split]} images, {self.annotations.get(split, 0)} annotations"
             for split in self.images]
    lines.append(f"{'skipped' if self.images else 'would skip'} {len(self.skipped_images)} "
                 f"images, {len(self.skipped_annotations)} annotations")
    for kind, problems in self.by_kind().items():
      lines.append(f"{self.severity(kind).value} {kind.key} ({kind.description}): "
                   f"{len(problems)}")
      for p in problems[:max_listed]:
        lines.append(f"  {p.message}")
      if len(problems) > max_listed:
        lines.append(f"  ... and {len(problems) - max_listed} more (all in the report file)")
    if self.largest_box_count:
      lines.append(self.box_count_line())
    if self.fatal:
      lines.append(f"stopped: {len(self.fatal)} fatal problems; no dataset was written")
    return "\n".join(lines)

  def suggested_max_boxes(self) -> int:
    """`data.max_boxes` to train with: the largest box count of any split, rounded up to a
    multiple of 100 (at least 100, the default)."""
    largest = max((n for n, _ in self.largest_box_count.values()), default=0)
    return max(100, -(-largest // 100) * 100)

  def box_count_line(self) -> str:
    per_split = ", ".join(f"{split} {n} (image id {image_id})"
                          for split, (n, image_id) in self.largest_box_count.items())
    return (f"largest box count per image: {per_split}; suggested cap: "
            f"--config.data.max_boxes={self.suggested_max_boxes()} (boxes beyond data.max_boxes are "
            f"left out of training and counted as truncated)")

  def to_json(self) -> dict:
    return {
        "format": REPORT_FORMAT,
        "strict": self.strict,
        "fatal": bool(self.fatal),
        "images": self.images,
        "annotations": self.annotations,
        "counts": {kind.key: len(ps) for kind, ps in self.by_kind().items()},
        "problems": {kind.key: {"severity": self.severity(kind).value,
                                "description": kind.description,
                                "count": len(ps), "items": [p.to_json() for p in ps]}
                     for kind, ps in self.by_kind().items()},
        "skipped_images": self.skipped_images,
        "skipped_annotations": self.skipped_annotations,
        "largest_box_count": {split: {"boxes": n, "image_id": i}
                              for split, (n, i) in self.largest_box_count.items()},
        "suggested_max_boxes": self.suggested_max_boxes(),
    }


def check_report_path(path: str) -> None:
  """Raises FileExistsError when `path` exists and is not an earlier report (never replaced)."""
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      is_report = json.load(f).get("format") == REPORT_FORMAT
  except (OSError, ValueError, AttributeError):
    is_report = False
  if not is_report:
    raise FileExistsError(f"{path} exists and is not a prepare_dataset report; not replacing it "
                          "(choose another --report)")


def write_report(report: Report, path: str) -> None:
  """Writes `report` as JSON to `path`; refuses to replace a file that is not an earlier report."""
  check_report_path(path)
  with open(path, "w") as f:
    json.dump(report.to_json(), f, indent=1)


def read_annotations(path: str, report: Report, *, split: str | None = None) -> dict | None:
  """The parsed JSON object of `path`, or None (with the problem added to `report`)."""
  try:
    with epath.Path(path).open("r") as f:
      obj = json.load(f)
  except json.JSONDecodeError as e:
    report.add(ProblemKind.MALFORMED_JSON, f"{path}: malformed JSON: {e}", split=split,
               file_name=str(path))
    return None
  except (OSError, UnicodeDecodeError) as e:
    report.add(ProblemKind.UNREADABLE_ANNOTATIONS, f"{path}: cannot read annotations: {e}",
               split=split, file_name=str(path))
    return None
  if not isinstance(obj, dict):
    report.add(ProblemKind.NOT_COCO, f"{path}: expected a JSON object with 'images', "
               f"'annotations' and 'categories', got a {type(obj).__name__}", split=split,
               file_name=str(path))
    return None
  return obj


# ------------------------------------------------------------------------------------------------
# The JSON.

# Annotation fields that evaluators read besides the box (evaluation/miss_rate.py: visibility and
# ignore flags of pedestrian datasets); kept as they are in ground_truth_{split}.json when present.
EVALUATION_FIELDS = ("vis_ratio", "vis_bbox", "visible_bbox", "bbox_vis", "ignore")


@dataclasses.dataclass
class Object:
  """One kept annotation; `box` is [x1, y1, x2, y2] in pixels, clipped to the image; `extra` its
  `EVALUATION_FIELDS`."""

  source_id: int
  box: tuple[float, float, float, float]
  category_id: int
  is_crowd: bool
  area: float
  extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Validation:
  """What `validate` found: per split, [(image record, [Object], re-encode)] in image id order for
  the kept images (re-encode: the bytes are not JPEG/PNG and are stored re-encoded as PNG), the
  categories of the first split, and the report."""

  splits: dict[str, list[tuple[dict, list[Object], bool]]]
  categories: list[dict]
  report: Report


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fields(record, required: Mapping[str, Callable], where: str, report: Report, **ids) -> bool:
  """True when `record` is a dict with every required field of the right type; else reports."""
  if not isinstance(record, dict):
    report.add(ProblemKind.MISSING_OR_INVALID_FIELD,
               f"{where}: expected an object, got {record!r:.80}", **ids)
    return False
  ok = True
  for key, check in required.items():
    if key not in record:
      report.add(ProblemKind.MISSING_OR_INVALID_FIELD, f"{where}: missing required field {key!r}",
                 **ids)
      ok = False
    elif not check(record[key]):
      report.add(ProblemKind.MISSING_OR_INVALID_FIELD,
                 f"{where}: field {key!r} has the wrong type: {record[key]!r:.80}", **ids)
      ok = False
  return ok


def _categories(coco: dict, split: str, report: Report) -> list[dict]:
  where = f"split {split!r}"
  categories = coco.get("categories")
  if not isinstance(categories, list) or not categories:
    report.add(ProblemKind.NOT_COCO, f"{where}: 'categories' must be a non-empty list, got "
               f"{categories!r:.80}", split=split)
    return []
  valid, ids, names = [], {}, {}
  for i, c in enumerate(categories):
    cid = c.get("id") if isinstance(c, dict) else None
    if not _fields(c, {"id": _is_int, "name": lambda v: isinstance(v, str)},
                   f"{where}: categories[{i}]", report, split=split,
                   category_id=cid if _is_int(cid) else None):
      continue
    if cid in ids:
      report.add(ProblemKind.DUPLICATE_CATEGORY_ID, f"{where}: duplicate category id {cid} "
                 f"(categories[{ids[cid]}] and [{i}])", split=split, category_id=cid)
      continue
    ids[cid] = i
    if c["name"] in names:
      report.add(ProblemKind.DUPLICATE_CATEGORY_NAME,
                 f"{where}: category ids {names[c['name']]} and {cid} are both named "
                 f"{c['name']!r}", split=split, category_id=cid)
    else:
      names[c["name"]] = cid
    valid.append({"id": cid, "name": c["name"]})
  return valid


_IMAGE_FIELDS = {"id": _is_int, "file_name": lambda v: isinstance(v, str), "width": _is_int,
                 "height": _is_int}
_ANNOTATION_FIELDS = {"id": _is_int, "image_id": _is_int, "category_id": _is_int,
                      "bbox": lambda v: isinstance(v, list)}


def _images(coco: dict, split: str, report: Report) -> dict[int, dict]:
  where = f"split {split!r}"
  images = coco.get("images")
  if not isinstance(images, list):
    report.add(ProblemKind.NOT_COCO, f"{where}: 'images' must be a list, got {images!r:.80}",
               split=split)
    return {}
  records: dict[int, dict] = {}
  by_file: dict[str, int] = {}
  for i, record in enumerate(images):
    image_id = record.get("id") if isinstance(record, dict) else None
    image_id = image_id if _is_int(image_id) else None
    file_name = record.get("file_name") if isinstance(record, dict) else None
    here = f"{where}: image id {image_id}" if image_id is not None else f"{where}: images[{i}]"
    if not _fields(record, _IMAGE_FIELDS, here, report, split=split, image_id=image_id,
                   file_name=file_name if isinstance(file_name, str) else None):
      continue
    ids = dict(split=split, image_id=image_id, file_name=file_name)
    if image_id in records:
      report.add(ProblemKind.DUPLICATE_IMAGE_ID, f"{here}: duplicate image id {image_id} "
                 f"({records[image_id]['file_name']} and {file_name})", **ids)
      continue
    if not 0 <= image_id <= _INT32_MAX:
      report.add(ProblemKind.IMAGE_ID_OUT_OF_RANGE, f"{where}: image id {image_id} is outside "
                 f"0..{_INT32_MAX} (batches carry int32 image ids)", **ids)
      continue
    if file_name in by_file:
      report.add(ProblemKind.DUPLICATE_FILE_NAME, f"{where}: file {file_name!r} is listed as "
                 f"image ids {by_file[file_name]} and {image_id}", **ids)
      continue
    by_file[file_name] = image_id
    records[image_id] = record
  return records


def _annotations(coco: dict, split: str, records: dict[int, dict], category_ids: set[int], *,
                 box_tolerance: float, report: Report) -> dict[int, list[Object]]:
  where = f"split {split!r}"
  objects: dict[int, list[Object]] = {image_id: [] for image_id in records}
  annotations = coco.get("annotations", [])
  if not isinstance(annotations, list):
    report.add(ProblemKind.NOT_COCO, f"{where}: 'annotations' must be a list, got "
               f"{annotations!r:.80}", split=split)
    return objects
  seen: set[int] = set()
  for i, ann in enumerate(annotations):
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    ann_id = ann_id if _is_int(ann_id) else None
    image_id = ann.get("image_id") if isinstance(ann, dict) else None
    ids = dict(split=split, annotation_id=ann_id, image_id=image_id if _is_int(image_id) else None)
    here = (f"{where}: annotation id {ann_id}" if ann_id is not None
            else f"{where}: annotations[{i}]")
    if not _fields(ann, _ANNOTATION_FIELDS, here, report, **ids):
      continue
    if ann_id in seen:
      report.add(ProblemKind.DUPLICATE_ANNOTATION_ID, f"{where}: duplicate annotation id {ann_id}",
                 **ids)
      continue
    seen.add(ann_id)
    here = f"annotation id {ann_id} (image id {image_id}, split {split!r})"
    bbox, category_id = ann["bbox"], ann["category_id"]
    if image_id not in records:
      report.add(ProblemKind.UNKNOWN_IMAGE_ID, f"{here}: unknown image id {image_id}", **ids)
      continue
    ids["file_name"] = records[image_id]["file_name"]
    if category_id not in category_ids:
      report.add(ProblemKind.UNKNOWN_CATEGORY_ID, f"{here}: unknown category id {category_id}",
                 category_id=category_id, **ids)
      continue
    if len(bbox) != 4 or not all(_is_number(v) and math.isfinite(v) for v in bbox):
      report.add(ProblemKind.INVALID_BBOX, f"{here}: bbox must be 4 finite numbers [x, y, w, h], "
                 f"got {bbox!r:.80}", **ids)
      continue
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1):
      report.add(ProblemKind.INVALID_ISCROWD, f"{here}: iscrowd must be 0 or 1, got {crowd!r:.80}",
                 **ids)
      continue
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
      report.add(ProblemKind.EMPTY_BOX, f"{here}: box {bbox} has non-positive width or height",
                 **ids)
      continue
    width, height = records[image_id]["width"], records[image_id]["height"]
    t = box_tolerance
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
      report.add(ProblemKind.BOX_OUTSIDE_IMAGE,
                 f"{here}: box {bbox} lies outside the {width}x{height} image", **ids)
      continue
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    area = ann.get("area", w * h)
    objects[image_id].append(Object(ann_id, (x1, y1, x2, y2), category_id, bool(crowd),
                                    float(area) if _is_number(area) else w * h,
                                    {k: ann[k] for k in EVALUATION_FIELDS if k in ann}))
  return objects


# ------------------------------------------------------------------------------------------------
# The images.

def check_image(data: bytes, record: dict) -> bool:
  """Decodes `data` fully; returns whether it must be re-encoded (not JPEG/PNG in a storable mode).

  Raises:
    ValueError: the decoded size differs from the record's.
    OSError, SyntaxError, Image.DecompressionBombError: not a decodable image.
  """
  with Image.open(io.BytesIO(data)) as im:
    im.load()  # decodes fully: truncated files fail here
    if im.size != (record["width"], record["height"]):
      raise ValueError(f"image is {im.size[0]}x{im.size[1]} but its record says "
                       f"{record['width']}x{record['height']}")
    return not (im.format in ("JPEG", "PNG") and im.mode in ("RGB", "L", "RGBA", "LA", "P"))


def storable_bytes(data: bytes, reencode: bool) -> bytes:
  """The bytes stored for an image that passed `check_image` (others re-encoded as PNG)."""
  if not reencode:
    return data
  with Image.open(io.BytesIO(data)) as im:
    buffer = io.BytesIO()
    im.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _check_file(read_image: Callable[[dict], bytes], record: dict):
  """(problem kind or None, message or re-encode flag) of one image record."""
  try:
    data = read_image(record)
  except OSError as e:
    return ProblemKind.MISSING_IMAGE, f"missing or unreadable: {e}"
  try:
    return None, check_image(data, record)
  except ValueError as e:
    return ProblemKind.IMAGE_SIZE_MISMATCH, str(e)
  except Image.UnidentifiedImageError:
    return ProblemKind.UNDECODABLE_IMAGE, "not a decodable image: PIL knows no such format"
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    # PIL reports most broken files as OSError, some broken PNGs as SyntaxError.
    return ProblemKind.UNDECODABLE_IMAGE, f"not a decodable image: {e}"


def _ids_names(categories: list[dict]) -> list[tuple[int, str]]:
  return sorted((c["id"], c["name"]) for c in categories)


def validate(splits: Mapping[str, tuple[dict, Callable[[dict], bytes]]], *,
             box_tolerance: float = 1.0, strict: bool = False, report: Report | None = None,
             num_threads: int | None = None) -> Validation:
  """Validates every split (its COCO dict and every image) and reports every problem.

  Args:
    splits: split name -> (COCO-format dict, read_image: image record -> encoded bytes, raising
      OSError when missing).
    box_tolerance: boxes may exceed the image by this many pixels (and are clipped).
    strict: SKIP problems count as fatal.
    report: problems found earlier (e.g. while reading the files) to add to.
    num_threads: threads reading and decoding images (None: min(16, CPUs + 4)).

  Returns:
    A Validation; its report's `fatal` list is empty when the dataset may be written.
  """
  report = report or Report()
  report.strict = strict
  parsed, first_categories, first_split = {}, None, None
  for split, (coco, read_image) in splits.items():
    if not isinstance(coco, dict):
      report.add(ProblemKind.NOT_COCO, f"split {split!r}: expected a COCO-format object, got a "
                 f"{type(coco).__name__}", split=split)
      continue
    categories = _categories(coco, split, report)
    if first_categories is None:
      first_categories, first_split = categories, split
    elif categories and _ids_names(categories) != _ids_names(first_categories):
      report.add(ProblemKind.CATEGORIES_DIFFER, f"split {split!r} has categories {categories} "
                 f"but split {first_split!r} has {first_categories}", split=split)
    records = _images(coco, split, report)
    objects = _annotations(coco, split, records, {c["id"] for c in categories},
                           box_tolerance=box_tolerance, report=report)
    parsed[split] = (records, objects, read_image)

  kept = {}
  with concurrent.futures.ThreadPoolExecutor(num_threads or min(16, (os.cpu_count() or 1) + 4)
                                             ) as pool:
    for split, (records, objects, read_image) in parsed.items():
      order = sorted(records)
      kept[split] = []
      for image_id, (kind, result) in zip(order, pool.map(
          lambda i, r=read_image: _check_file(r, records[i]), order)):
        record = records[image_id]
        if kind is not None:
          report.add(kind, f"image id {image_id} ({record['file_name']}, split {split!r}): "
                     f"{result}", split=split, image_id=image_id, file_name=record["file_name"])
          continue
        kept[split].append((record, objects[image_id], result))
  for split, images in kept.items():
    if images:
      report.largest_box_count[split] = max((len(objs), record["id"]) for record, objs, _ in images)
  return Validation(kept, first_categories or [], report)
