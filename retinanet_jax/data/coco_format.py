"""Any COCO-format detection dataset -> a TFDS dataset (with TFDS's own builder API).

`build_tfds_dataset(name, splits, data_dir=...)` validates every split in one pass
(coco_validation.py: the JSON, then every image file, every problem reported at once), and, when no
problem is fatal, writes a TFDS dataset readable by name (`tfds.builder(name, data_dir=data_dir)`),
plus three files in the dataset's folder:

* `label_map.json`: contiguous labels <-> the dataset's own category ids and names (`LabelMap`);
* `ground_truth_{split}.json`: the COCO-format ground truth that evaluation uses: original pixels,
  original category ids, crowd flags, original `area`, and the fields evaluators read when present
  (`coco_validation.EVALUATION_FIELDS`: visibility, ignore flags); annotation `id`s are renumbered
  1..N (pycocotools treats id 0 as "unmatched") and the original id is kept as `source_id`;
* `prepare_report.json`: counts and every problem, grouped by kind, each naming its ids.

Stored features (one example per image; boxes in original pixels):
  image: encoded bytes exactly as read (JPEG or PNG; other formats are re-encoded as PNG);
  image/id: int64; image/filename: text;
  objects: id int64 [N], bbox_xyxy float32 [N, 4] ([x1, y1, x2, y2]), label int64 [N] (contiguous,
    0..K-1), is_crowd bool [N].

Bad input (the kinds and their severities: coco_validation.ProblemKind): fatal problems (malformed
JSON, JSON that is not COCO, missing/ill-typed required fields, duplicate image, annotation or
category ids, one file under two image ids, image ids outside int32, splits whose categories differ)
raise one `CocoFormatError` listing all of them, with the full `Report` attached; skippable ones (a
missing, undecodable or wrongly-sized image; an annotation on an unknown image or category id, with a
bbox that is not 4 finite numbers, non-positive width or height, outside the image by more than
`box_tolerance` pixels (boxes within it are clipped), or `iscrowd` not 0/1) are counted and left out
(`strict=True`: fatal too). Images without annotations are kept (negatives).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from retinanet_jax.data import coco_validation
from retinanet_jax.data.coco_validation import Report, Validation
from retinanet_jax.data.labels import LabelMap

VERSION = "1.0.0"
LABEL_MAP_FILE = "label_map.json"
REPORT_FILE = "prepare_report.json"


def ground_truth_file(split: str) -> str:
  return f"ground_truth_{split}.json"


class CocoFormatError(ValueError):
  """The input cannot be turned into a dataset; the message lists what and where (every fatal
  problem, grouped by kind); `report` holds them all (None for errors of the call itself)."""

  def __init__(self, message: str, *, report: Report | None = None):
    super().__init__(message)
    self.report = report


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
  """Reads a COCO-format JSON file; malformed JSON or a non-object is a CocoFormatError naming the
  file."""
  report = Report()
  obj = coco_validation.read_annotations(path, report)
  if obj is None:
    raise CocoFormatError(report.problems[0].message, report=report)
  return obj


def image_reader(images_dir: str) -> Callable[[dict], bytes]:
  """`read_image` for files `images_dir/record['file_name']`."""
  root = epath.Path(images_dir)

  def read(record: dict) -> bytes:
    return (root / record["file_name"]).read_bytes()
  return read


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
                       description: str | None = None,
                       report: Report | None = None) -> tuple[tfds.core.DatasetBuilder, Report]:
  """Validates (all of it, in one pass) and stores a COCO-format dataset as TFDS `name[/config]`.

  Args:
    name: TFDS dataset name (letters, digits, underscores; must not be a TFDS catalogue name).
    splits: split name -> SplitSource. All splits must share the same categories.
    data_dir: TFDS data folder; None: TFDS's default.
    config: optional TFDS builder-config name (the dataset is then read as "name/config").
    box_tolerance: boxes may exceed the image by this many pixels (and are clipped).
    strict: skippable problems are fatal too.
    description: free text stored in the dataset info.
    report: problems found before (e.g. while reading the annotation files) to report with these.

  Returns:
    The prepared builder and the Report (also written as prepare_report.json).

  Raises:
    CocoFormatError: some problem is fatal (all of them are in its message and `.report`), or the
      dataset exists already; nothing is written then.
  """
  check_dataset_name(name)
  validation = validate_splits(splits, box_tolerance=box_tolerance, strict=strict, report=report)
  raise_if_fatal(validation.report)
  return write_tfds_dataset(name, validation, splits, data_dir=data_dir, config=config,
                            description=description), validation.report


def check_dataset_name(name: str) -> None:
  if not tfds.core.naming.is_valid_dataset_and_class_name(name):
    raise CocoFormatError(f"dataset name must match [a-zA-Z][a-zA-Z0-9_]*, got {name!r}")


def validate_splits(splits: Mapping[str, SplitSource], *, box_tolerance: float = 1.0,
                    strict: bool = False, report: Report | None = None) -> Validation:
  """coco_validation.validate over SplitSources (writes nothing); see build_tfds_dataset."""
  if not splits:
    raise CocoFormatError("no splits given")
  return coco_validation.validate(
      {split: (s.annotations, s.read_image) for split, s in splits.items()},
      box_tolerance=box_tolerance, strict=strict, report=report)


def raise_if_fatal(report: Report) -> None:
  fatal = report.fatal
  if fatal:
    lines = [f"{len(fatal)} fatal problems:"] + [f"  {p.message}" for p in fatal]
    raise CocoFormatError("\n".join(lines), report=report)


def write_tfds_dataset(name: str, validation: Validation, splits: Mapping[str, SplitSource], *,
                       data_dir: str | None = None, config: str | None = None,
                       description: str | None = None) -> tfds.core.DatasetBuilder:
  """Writes the images that `validation` kept (see build_tfds_dataset); returns the builder."""
  report = validation.report
  label_map = LabelMap.from_categories(validation.categories)
  kept: dict[str, list] = {split: [] for split in splits}  # filled while TFDS generates

  def generate(split: str):
    read_image = splits[split].read_image
    for record, objects, reencode in validation.splits[split]:
      image_id = record["id"]
      try:  # checked by validate; read again here (a file may have gone since)
        data = coco_validation.storable_bytes(read_image(record), reencode)
      except OSError as e:
        report.add(coco_validation.ProblemKind.MISSING_IMAGE,
                   f"image id {image_id} ({record['file_name']}, split {split!r}): missing or "
                   f"unreadable: {e}", split=split, image_id=image_id,
                   file_name=record["file_name"])
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
    files[REPORT_FILE] = json.dumps(report.to_json(), indent=1)
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
  return builder


class _Lazy:
  """An Iterable of (key, example) that runs `generate(split)` when TFDS iterates it."""

  def __init__(self, generate, split):
    self._generate, self._split = generate, split

  def __iter__(self):
    return self._generate(self._split)


def ground_truth_dict(kept: list, label_map: LabelMap) -> dict:
  """COCO-format ground truth of [(image record, [coco_validation.Object])]; annotation ids renumbered 1..N."""
  images, annotations = [], []
  for record, objects in kept:
    images.append({"id": record["id"], "width": record["width"], "height": record["height"],
                   "file_name": record["file_name"]})
    for o in objects:
      x1, y1, x2, y2 = o.box
      annotations.append({
          "id": len(annotations) + 1, "source_id": o.source_id, "image_id": record["id"],
          "category_id": o.category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": o.area,
          "iscrowd": int(o.is_crowd), **o.extra})
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

