"""Any COCO-format detection dataset -> a TFDS dataset (with TFDS's own builder API).

`build_tfds_dataset(name, splits, data_dir=...)` validates each split's COCO-format dict, reads and
checks every image, and writes a TFDS dataset readable by name (`tfds.builder(name,
data_dir=data_dir)`), plus three files in the dataset's folder:

* `label_map.json`: contiguous labels <-> the dataset's own category ids and names (`LabelMap`);
* `ground_truth_{split}.json`: the COCO-format ground truth that evaluation uses: original pixels,
  original category ids, crowd flags, original `area`; annotation `id`s are renumbered 1..N (pycocotools
  treats id 0 as "unmatched") and the original id is kept as `source_id`;
* `prepare_report.json`: counts and the message of every skipped image or annotation.

Stored features (one example per image; boxes in original pixels):
  image: encoded bytes exactly as read (JPEG or PNG; other formats are re-encoded as PNG);
  image/id: int64; image/filename: text;
  objects: id int64 [N], bbox_xyxy float32 [N, 4] ([x1, y1, x2, y2]), label int64 [N] (contiguous,
    0..K-1), is_crowd bool [N].

Bad input:
* errors (`CocoFormatError`): malformed JSON, missing/ill-typed required fields, duplicate image,
  annotation or category ids, image ids outside int32, splits whose categories differ;
* counted skips (message names the id; with `strict=True` they are errors too): a missing or
  unreadable image, an image whose size differs from its record, an annotation on an unknown image
  or with an unknown category id, a box with non-positive or non-finite width or height, a box
  outside the image by more than `box_tolerance` pixels (boxes within the tolerance are clipped).
Images without annotations are kept (negatives).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from retinanet_jax.data.labels import LabelMap

VERSION = "1.0.0"
LABEL_MAP_FILE = "label_map.json"
REPORT_FILE = "prepare_report.json"
_INT32_MAX = 2**31 - 1


def ground_truth_file(split: str) -> str:
  return f"ground_truth_{split}.json"


class CocoFormatError(ValueError):
  """The input cannot be turned into a dataset; the message says what and where."""


@dataclasses.dataclass
class SplitSource:
  """One split of a COCO-format dataset.

  Attributes:
    annotations: COCO-format dict with `images`, `annotations` (may be absent: no objects) and
      `categories`.
    read_image: image record (a dict from `images`) -> encoded image bytes; raises OSError when the
      image is missing or unreadable.
  """

  annotations: dict
  read_image: Callable[[dict], bytes]


def load_annotations(path: str) -> dict:
  """Reads a COCO-format JSON file; malformed JSON is a CocoFormatError naming the file."""
  try:
    with epath.Path(path).open("r") as f:
      obj = json.load(f)
  except json.JSONDecodeError as e:
    raise CocoFormatError(f"{path}: malformed JSON: {e}") from None
  except OSError as e:
    raise CocoFormatError(f"{path}: cannot read annotations: {e}") from None
  if not isinstance(obj, dict):
    raise CocoFormatError(f"{path}: expected a JSON object with 'images', 'annotations' and "
                          f"'categories', got {type(obj).__name__}")
  return obj


def image_reader(images_dir: str) -> Callable[[dict], bytes]:
  """`read_image` for files `images_dir/record['file_name']`."""
  root = epath.Path(images_dir)

  def read(record: dict) -> bytes:
    return (root / record["file_name"]).read_bytes()
  return read


@dataclasses.dataclass
class Report:
  """What happened to the input: counts and one message per skipped item."""

  images: dict[str, int] = dataclasses.field(default_factory=dict)
  annotations: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped_images: list[str] = dataclasses.field(default_factory=list)
  skipped_annotations: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"{split}: {self.images[split]} images, {self.annotations.get(split, 0)} annotations"
             for split in self.images]
    lines.append(f"skipped {len(self.skipped_images)} images, "
                 f"{len(self.skipped_annotations)} annotations")
    for message in self.skipped_images + self.skipped_annotations:
      lines.append(f"  skipped {message}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Validation of the JSON (everything except the image bytes).

def _require(obj: dict, key: str, types, where: str):
  if not isinstance(obj, dict) or key not in obj:
    raise CocoFormatError(f"{where}: missing required field {key!r}")
  value = obj[key]
  if isinstance(value, bool) or not isinstance(value, types):
    raise CocoFormatError(f"{where}: field {key!r} must be {types}, got {value!r}")
  return value


def parse_categories(coco: dict, where: str) -> LabelMap:
  categories = _require(coco, "categories", list, where)
  seen = set()
  for i, c in enumerate(categories):
    cid = _require(c, "id", int, f"{where}: categories[{i}]")
    _require(c, "name", str, f"{where}: categories[{i}]")
    if cid in seen:
      raise CocoFormatError(f"{where}: duplicate category id {cid}")
    seen.add(cid)
  if not categories:
    raise CocoFormatError(f"{where}: 'categories' is empty")
  return LabelMap.from_categories(categories)


@dataclasses.dataclass
class _Object:
  source_id: int
  box: tuple[float, float, float, float]  # x1, y1, x2, y2, clipped to the image
  category_id: int
  is_crowd: bool
  area: float


def _parse_split(split: str, coco: dict, label_map: LabelMap, *, box_tolerance: float,
                 skip: Callable[[list[str], str], None], report: Report):
  """Returns [(image record, [_Object])] in image id order, after JSON-level validation."""
  where = f"split {split!r}"
  images = _require(coco, "images", list, where)
  annotations = coco.get("annotations", [])
  if not isinstance(annotations, list):
    raise CocoFormatError(f"{where}: 'annotations' must be a list, got {type(annotations)}")

  records: dict[int, dict] = {}
  for i, record in enumerate(images):
    image_id = _require(record, "id", int, f"{where}: images[{i}]")
    _require(record, "file_name", str, f"{where}: image id {image_id}")
    for key in ("width", "height"):
      _require(record, key, int, f"{where}: image id {image_id}")
    if image_id in records:
      raise CocoFormatError(f"{where}: duplicate image id {image_id}")
    if not 0 <= image_id <= _INT32_MAX:
      raise CocoFormatError(f"{where}: image id {image_id} is outside 0..{_INT32_MAX} (batches "
                            "carry int32 image ids)")
    records[image_id] = record

  objects: dict[int, list[_Object]] = {image_id: [] for image_id in records}
  known_categories = set(label_map.category_ids)
  seen_ids = set()
  for i, ann in enumerate(annotations):
    ann_id = _require(ann, "id", int, f"{where}: annotations[{i}]")
    here = f"{where}: annotation id {ann_id}"
    image_id = _require(ann, "image_id", int, here)
    category_id = _require(ann, "category_id", int, here)
    bbox = _require(ann, "bbox", list, here)
    if ann_id in seen_ids:
      raise CocoFormatError(f"{where}: duplicate annotation id {ann_id}")
    seen_ids.add(ann_id)
    here = f"annotation id {ann_id} (image id {image_id}, split {split!r})"
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in bbox):
      raise CocoFormatError(f"{here}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    if image_id not in records:
      skip(report.skipped_annotations, f"{here}: unknown image id {image_id}")
      continue
    if category_id not in known_categories:
      skip(report.skipped_annotations, f"{here}: unknown category id {category_id}")
      continue
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
      skip(report.skipped_annotations, f"{here}: non-finite box {bbox}")
      continue
    if w <= 0 or h <= 0:
      skip(report.skipped_annotations, f"{here}: box {bbox} has non-positive width or height")
      continue
    width, height = records[image_id]["width"], records[image_id]["height"]
    t = box_tolerance
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
      skip(report.skipped_annotations,
           f"{here}: box {bbox} lies outside the {width}x{height} image")
      continue
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    area = ann.get("area", w * h)
    objects[image_id].append(_Object(
        ann_id, (x1, y1, x2, y2), category_id, bool(ann.get("iscrowd", 0)),
        float(area) if isinstance(area, (int, float)) else w * h))
  return [(records[image_id], objects[image_id]) for image_id in sorted(records)]


def _checked_image(data: bytes, record: dict) -> bytes:
  """Returns storable bytes (JPEG/PNG as-is, others re-encoded as PNG); raises OSError."""
  with Image.open(io.BytesIO(data)) as im:
    im.load()  # decodes fully: truncated files fail here
    size = im.size
    if size != (record["width"], record["height"]):
      raise OSError(f"image is {size[0]}x{size[1]} but its record says "
                    f"{record['width']}x{record['height']}")
    if im.format in ("JPEG", "PNG") and im.mode in ("RGB", "L", "RGBA", "LA", "P"):
      return data
    buffer = io.BytesIO()
    im.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# The TFDS builder.

def features(label_map: LabelMap) -> tfds.features.FeaturesDict:
  names = list(label_map.names)
  label = (tfds.features.ClassLabel(names=names) if len(set(names)) == len(names)
           else tfds.features.ClassLabel(num_classes=label_map.num_classes))
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=None),
      "image/id": np.int64,
      "image/filename": tfds.features.Text(),
      "objects": tfds.features.Sequence({
          "id": np.int64,
          "bbox_xyxy": tfds.features.Tensor(shape=(4,), dtype=np.float32),
          "label": label,
          "is_crowd": np.bool_,
      }),
  })


class _Builder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
  """AdhocBuilder that also writes extra files into the (still temporary) dataset folder, so that
  they appear atomically with the dataset."""

  # No download checksums to look up. (TFDS's default lookup imports the `importlib_resources`
  # backport, which is not installed on Python >= 3.9.)
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, extra_files: Callable[[], Mapping[str, str]], **kwargs):
    self._extra_files = extra_files
    super().__init__(**kwargs)

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    for filename, text in self._extra_files().items():
      (epath.Path(self.data_dir) / filename).write_text(text)


def build_tfds_dataset(name: str, splits: Mapping[str, SplitSource], *,
                       data_dir: str | None = None, config: str | None = None,
                       box_tolerance: float = 1.0, strict: bool = False,
                       description: str | None = None) -> tuple[tfds.core.DatasetBuilder, Report]:
  """Validates and stores a COCO-format dataset as TFDS dataset `name[/config]` in `data_dir`.

  Args:
    name: TFDS dataset name (letters, digits, underscores; must not be a TFDS catalogue name).
    splits: split name -> SplitSource. All splits must share the same categories.
    data_dir: TFDS data folder; None: TFDS's default.
    config: optional TFDS builder-config name (the dataset is then read as "name/config").
    box_tolerance: boxes may exceed the image by this many pixels (and are clipped).
    strict: turn every counted skip into a CocoFormatError.
    description: free text stored in the dataset info.

  Returns:
    The prepared builder and the Report (also written as prepare_report.json).
  """
  if not tfds.core.naming.is_valid_dataset_and_class_name(name):
    raise CocoFormatError(f"dataset name must match [a-zA-Z][a-zA-Z0-9_]*, got {name!r}")
  if not splits:
    raise CocoFormatError("no splits given")
  report = Report()

  def skip(bucket: list[str], message: str) -> None:
    if strict:
      raise CocoFormatError(message)
    bucket.append(message)

  label_map = None
  parsed = {}
  for split, source in splits.items():
    split_map = parse_categories(source.annotations, f"split {split!r}")
    if label_map is not None and split_map != label_map:
      raise CocoFormatError(f"split {split!r} has categories {split_map} but an earlier split "
                            f"has {label_map}")
    label_map = split_map
    parsed[split] = _parse_split(split, source.annotations, label_map,
                                 box_tolerance=box_tolerance, skip=skip, report=report)

  kept: dict[str, list] = {split: [] for split in splits}  # filled while TFDS generates

  def generate(split: str):
    read_image = splits[split].read_image
    for record, objects in parsed[split]:
      image_id = record["id"]
      try:
        data = _checked_image(read_image(record), record)
      except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # Missing files and most PIL failures are OSErrors; PIL reports some broken PNGs as
        # SyntaxError and huge images as DecompressionBombError.
        skip(report.skipped_images, f"image id {image_id} ({record['file_name']}, split "
                                    f"{split!r}): missing or unreadable: {e}")
        continue
      kept[split].append((record, objects))
      yield image_id, {
          "image": data,
          "image/id": image_id,
          "image/filename": record["file_name"],
          "objects": {
              "id": np.asarray([o.source_id for o in objects], np.int64),
              "bbox_xyxy": np.asarray([o.box for o in objects], np.float32).reshape(-1, 4),
              "label": np.asarray([label_map.to_label(o.category_id) for o in objects], np.int64),
              "is_crowd": np.asarray([o.is_crowd for o in objects], np.bool_),
          },
      }

  def extra_files() -> dict[str, str]:
    files = {LABEL_MAP_FILE: json.dumps(label_map.to_json(), indent=1)}
    for split in splits:
      report.images[split] = len(kept[split])
      report.annotations[split] = sum(len(objs) for _, objs in kept[split])
      files[ground_truth_file(split)] = json.dumps(
          ground_truth_dict(kept[split], label_map))
    files[REPORT_FILE] = json.dumps(dataclasses.asdict(report), indent=1)
    return files

  builder = _Builder(
      name=name, version=VERSION, config=config, data_dir=data_dir,
      features=features(label_map),
      split_datasets={split: _Lazy(generate, split) for split in splits},
      description=description or "COCO-format detection dataset prepared by retinanet_jax.",
      extra_files=extra_files)
  if builder.is_prepared():
    raise CocoFormatError(f"dataset {name!r} already exists in {builder.data_dir}; delete that "
                          "folder to rebuild it")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder, report


class _Lazy:
  """An Iterable of (key, example) that runs `generate(split)` when TFDS iterates it."""

  def __init__(self, generate, split):
    self._generate, self._split = generate, split

  def __iter__(self):
    return self._generate(self._split)


def ground_truth_dict(kept: list, label_map: LabelMap) -> dict:
  """COCO-format ground truth of [(image record, [_Object])]; annotation ids renumbered 1..N."""
  images, annotations = [], []
  for record, objects in kept:
    images.append({"id": record["id"], "width": record["width"], "height": record["height"],
                   "file_name": record["file_name"]})
    for o in objects:
      x1, y1, x2, y2 = o.box
      annotations.append({
          "id": len(annotations) + 1, "source_id": o.source_id, "image_id": record["id"],
          "category_id": o.category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": o.area,
          "iscrowd": int(o.is_crowd)})
  return {"info": {"description": "ground truth written by retinanet_jax"}, "images": images,
          "annotations": annotations, "categories": label_map.coco_categories()}


def read_dataset_file(builder: tfds.core.DatasetBuilder, filename: str) -> str:
  path = epath.Path(builder.data_dir) / filename
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: {builder.info.full_name} was not prepared by "
                            "retinanet_jax's prepare_dataset.py (or its folder was altered)")
  return path.read_text()


def is_coco_format(builder: tfds.core.DatasetBuilder) -> bool:
  """True for datasets written by build_tfds_dataset."""
  feature_keys = builder.info.features.keys()
  return "objects" in feature_keys and "bbox_xyxy" in builder.info.features["objects"].feature.keys()

