r"""Turns a COCO-format dataset (or the built-in synthetic one) into a TFDS dataset.

Custom dataset, one split per annotations file:
  python scripts/prepare_dataset.py --name my_boxes --data_dir ~/tfds \
    --annotations train=instances_train.json --images train=images/train \
    --annotations validation=instances_val.json --images validation=images/val
One file, split by image (seeded):
  python scripts/prepare_dataset.py --name my_boxes --annotations instances.json \
    --images images/ --validation_fraction 0.1
SKU-110K (CSV files `image_name,x1,y1,x2,y2,class,image_width,image_height`):
  python scripts/prepare_dataset.py --name sku110k --format sku110k \
    --annotations train=SKU110K/annotations/annotations_train.csv --images train=SKU110K/images \
    --annotations validation=SKU110K/annotations/annotations_val.csv --images validation=SKU110K/images
CARPK (per-image `x1 y1 x2 y2 class` text files; --annotations names a split's ImageSets list):
  python scripts/prepare_dataset.py --name carpk --format carpk \
    --annotations train=CARPK_devkit/data/ImageSets/train.txt --images train=CARPK_devkit/data/Images \
    --annotations test=CARPK_devkit/data/ImageSets/test.txt --images test=CARPK_devkit/data/Images
Built-in synthetic dataset (what `data.name = "synthetic"` reads; knobs: synthetic.SyntheticConfig):
  python scripts/prepare_dataset.py --synthetic [--synthetic_knob num_train=5000 ...]

Then train with `--config.data.name=my_boxes --config.data.data_dir=~/tfds`. The dataset folder also
holds label_map.json, ground_truth_{split}.json (evaluation) and prepare_report.json. The report (and
the console) give the largest box count of one image per split and the `data.max_boxes` to train
with (boxes beyond the cap are left out of training, and counted).

Every annotation file and image is validated first, in one pass, and every problem is printed,
grouped by kind with its count and first --max_listed ids (all of them in the report file). Fatal
problems (malformed JSON, JSON that is not COCO, missing required fields, duplicate ids or file
names) stop the run after the report, with exit status 3 and no dataset written; skippable ones (bad
images, bad boxes, unknown ids, ...) are left out and counted (`--strict`: fatal too). `--dry_run`
validates and reports without writing a dataset. A dry or stopped run writes its report to --report
(default ./prepare_report.json), never replacing a file that is not an earlier report (exit status
6 if asked to). Exit statuses: docs/failures.md, "Exit codes" (retinanet_jax/runtime/errors.py). TFDS's log lines are
shown with --verbose only; its progress bars become one updating line on a terminal.
"""

from __future__ import annotations

import ast
import sys
import time


from retinanet_jax.runtime import console  # (imports no JAX, no TensorFlow)

console.quiet_native_logs()

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from retinanet_jax.runtime import errors  # noqa: E402  pylint: disable=wrong-import-position
from retinanet_jax.data import (  # noqa: E402  pylint: disable=wrong-import-position
    annotation_readers, coco_format, coco_validation, config as config_lib, sources, synthetic)

_ANNOTATIONS = flags.DEFINE_multi_string(
    "annotations", [], "COCO-format JSON: PATH (split 'train') or SPLIT=PATH, repeatable.")
_IMAGES = flags.DEFINE_multi_string(
    "images", [], "Image folder (file_name is relative to it): DIR or SPLIT=DIR, repeatable.")
_NAME = flags.DEFINE_string("name", None, "TFDS dataset name, e.g. my_boxes.")
_FORMAT = flags.DEFINE_enum(
    "format", "coco", ["coco", "sku110k", "carpk"], "Annotation format of --annotations: COCO "
    "JSON; SKU-110K CSV files; CARPK ImageSets lists (or folders of per-image .txt files), "
    "retinanet_jax/data/annotation_readers.py.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data folder (default: TFDS's).")
_VALIDATION_FRACTION = flags.DEFINE_float(
    "validation_fraction", 0.0, "With a single annotations file: this fraction of its images "
    "(chosen with --seed) becomes split 'validation'.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of --validation_fraction.")
_BOX_TOLERANCE = flags.DEFINE_float(
    "box_tolerance", 1.0, "Boxes may exceed the image by this many pixels (then clipped).")
_STRICT = flags.DEFINE_bool("strict", False, "Skippable problems (bad images, boxes, ids) are fatal.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate and report only; write no dataset.")
_REPORT = flags.DEFINE_string(
    "report", None, "Write the report JSON here too (a dry or stopped run: default "
    "./prepare_report.json; a built dataset always has one in its folder).")
_MAX_LISTED = flags.DEFINE_integer("max_listed", 10, "Problems printed per kind (the report file "
                                   "has all of them).")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Build the built-in synthetic dataset.")
_SYNTHETIC_KNOBS = flags.DEFINE_multi_string(
    "synthetic_knob", [], "FIELD=VALUE override of SyntheticConfig, repeatable.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show TFDS's log lines and progress bars.")


def _by_split(values: list[str], flag: str) -> dict[str, str]:
  result = {}
  for value in values:
    split, sep, path = value.partition("=")
    if not sep:
      split, path = "train", value
    if split in result:
      raise app.UsageError(f"--{flag} given twice for split {split!r}")
    result[split] = path
  return result


def _split_by_fraction(coco: dict, fraction: float, seed: int) -> dict[str, dict]:
  """Splits a file's images (seeded); records without an int id and annotations on unknown image
  ids stay in 'train', where validation reports them."""
  images = coco["images"]
  ids = [im["id"] for im in images if isinstance(im, dict) and isinstance(im.get("id"), int)]
  order = np.random.default_rng(seed).permutation(len(ids))
  val = {ids[i] for i in order[:int(round(fraction * len(ids)))]}
  anns = coco.get("annotations", [])
  anns = anns if isinstance(anns, list) else []

  def part(records, key, validation):
    return [r for r in records if (isinstance(r, dict) and r.get(key) in val) == validation]
  return {
      "train": {**coco, "images": part(images, "id", False),
                "annotations": part(anns, "image_id", False)},
      "validation": {**coco, "images": part(images, "id", True),
                     "annotations": part(anns, "image_id", True)},
  }


def _read(path: str, images_dir: str, report, split: str) -> dict | None:
  """The COCO-format dict of one split's annotations in --format (None: unreadable, reported)."""
  if _FORMAT.value == "sku110k":
    return annotation_readers.read_sku110k_csv(path, images_dir, report, split=split)
  if _FORMAT.value == "carpk":
    return annotation_readers.read_carpk(path, images_dir, report, split=split)
  return coco_validation.read_annotations(path, report, split=split)


def _build_custom() -> bool:
  """Returns False when the run stopped at fatal problems."""
  if not _NAME.value:
    raise app.UsageError("--name is required (or use --synthetic)")
  coco_format.check_dataset_name(_NAME.value)
  annotations = _by_split(_ANNOTATIONS.value, "annotations")
  images = _by_split(_IMAGES.value, "images")
  if not annotations:
    raise app.UsageError("--annotations is required")
  if len(images) == 1 and len(annotations) > 1 and "train" in images and "=" not in _IMAGES.value[0]:
    images = {split: images["train"] for split in annotations}  # one folder for all splits
  if set(images) != set(annotations):
    raise app.UsageError(f"--images splits {sorted(images)} differ from --annotations splits "
                         f"{sorted(annotations)}")
  if _VALIDATION_FRACTION.value > 0 and len(annotations) != 1:
    raise app.UsageError("--validation_fraction needs exactly one --annotations file")
  report_path = _REPORT.value or ("prepare_report.json" if _DRY_RUN.value else None)
  if report_path:
    coco_validation.check_report_path(report_path)
  report = coco_validation.Report()
  cocos = {split: _read(path, images[split], report, split)
           for split, path in annotations.items()}
  cocos = {split: coco for split, coco in cocos.items() if coco is not None}  # others: reported
  if _VALIDATION_FRACTION.value > 0 and cocos:
    (split, coco), = cocos.items()
    if isinstance(coco.get("images"), list):  # else: validation reports it
      cocos = _split_by_fraction(coco, _VALIDATION_FRACTION.value, _SEED.value)
      images = {s: images[split] for s in cocos}
  splits = {split: coco_format.SplitSource(coco, coco_format.image_reader(images[split]))
            for split, coco in cocos.items()}
  report.strict = _STRICT.value
  validation = None
  if splits:  # else every file was unreadable, and that is reported
    validation = coco_format.validate_splits(splits, box_tolerance=_BOX_TOLERANCE.value,
                                             strict=_STRICT.value, report=report)
  if report.fatal or _DRY_RUN.value:
    print(report.summary(max_listed=_MAX_LISTED.value))
    path = report_path or "prepare_report.json"
    try:
      coco_validation.write_report(report, path)
      where = f"above and in {path}"
    except FileExistsError as e:  # a stopped run's default path, taken by a user's file
      where = f"above (not in a file: {e})"
    if report.fatal:
      kinds = sorted({p.kind.key for p in report.fatal})
      print(f"error: stopped by {len(report.fatal)} fatal problems ({', '.join(kinds)}); no "
            f"dataset was written; every problem is listed {where}", file=sys.stderr)
      return False
    print(f"dry run: no dataset written; report in {path}")
    return True
  with console.library_stdout():
    builder = coco_format.write_tfds_dataset(_NAME.value, validation, splits,
                                             data_dir=_DATA_DIR.value)
  print(report.summary(max_listed=_MAX_LISTED.value))
  if _REPORT.value:
    coco_validation.write_report(report, _REPORT.value)
  print(f"prepared {builder.info.full_name} in {builder.data_dir} (report: "
        f"{builder.data_dir}/{coco_format.REPORT_FILE})")
  print(f"use: --config.data.name={_NAME.value}"
        + (f" --config.data.data_dir={_DATA_DIR.value}" if _DATA_DIR.value else ""))
  return True


def _build_synthetic() -> None:
  c = config_lib.synthetic_data_config()
  c.data_dir = _DATA_DIR.value
  for knob in _SYNTHETIC_KNOBS.value:
    field, _, value = knob.partition("=")
    if field not in c.synthetic:
      raise app.UsageError(f"unknown synthetic knob {field!r}; known: {sorted(c.synthetic)}")
    parsed = ast.literal_eval(value)
    c.synthetic[field] = parsed
  start = time.perf_counter()
  with console.library_stdout():
    name = sources.ensure_synthetic_dataset(c)
  print(f"synthetic dataset {name} ready in {time.perf_counter() - start:.1f}s "
        f"({synthetic.SyntheticConfig.from_config(c.synthetic)})")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  console.setup(verbose=_VERBOSE.value)
  # CocoFormatError: exit status 3; FileExistsError: 6 (errors.run prints the paragraph).
  if _SYNTHETIC.value:
    _build_synthetic()
  elif not _build_custom():
    sys.exit(errors.DATA)  # the fatal problems are printed above


if __name__ == "__main__":
  errors.run(main)
