r"""Turns a COCO-format dataset (or the built-in synthetic one) into a TFDS dataset.

Custom dataset, one split per annotations file:
  python scripts/prepare_dataset.py --name my_boxes --data_dir ~/tfds \
    --annotations train=instances_train.json --images train=images/train \
    --annotations validation=instances_val.json --images validation=images/val
One file, split by image (seeded):
  python scripts/prepare_dataset.py --name my_boxes --annotations instances.json \
    --images images/ --validation_fraction 0.1
Built-in synthetic dataset (what `data.name = "synthetic"` reads; knobs: synthetic.SyntheticConfig):
  python scripts/prepare_dataset.py --synthetic [--synthetic_knob num_train=5000 ...]

Then train with `--config.data.name=my_boxes --config.data.data_dir=~/tfds`. The dataset folder also
holds label_map.json, ground_truth_{split}.json (evaluation) and prepare_report.json. Skipped images
and annotations are listed at the end; `--strict` makes the first one an error instead.
"""

from __future__ import annotations

import ast
import os
import sys
import time


import numpy as np
from absl import app, flags

from retinanet_jax.data import coco_format, config as config_lib, sources, synthetic

_ANNOTATIONS = flags.DEFINE_multi_string(
    "annotations", [], "COCO-format JSON: PATH (split 'train') or SPLIT=PATH, repeatable.")
_IMAGES = flags.DEFINE_multi_string(
    "images", [], "Image folder (file_name is relative to it): DIR or SPLIT=DIR, repeatable.")
_NAME = flags.DEFINE_string("name", None, "TFDS dataset name, e.g. my_boxes.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data folder (default: TFDS's).")
_VALIDATION_FRACTION = flags.DEFINE_float(
    "validation_fraction", 0.0, "With a single annotations file: this fraction of its images "
    "(chosen with --seed) becomes split 'validation'.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of --validation_fraction.")
_BOX_TOLERANCE = flags.DEFINE_float(
    "box_tolerance", 1.0, "Boxes may exceed the image by this many pixels (then clipped).")
_STRICT = flags.DEFINE_bool("strict", False, "Fail on the first bad image or annotation.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Build the built-in synthetic dataset.")
_SYNTHETIC_KNOBS = flags.DEFINE_multi_string(
    "synthetic_knob", [], "FIELD=VALUE override of SyntheticConfig, repeatable.")


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
  ids = [im.get("id") for im in coco["images"]]  # malformed records are reported later
  order = np.random.default_rng(seed).permutation(len(ids))
  val = {ids[i] for i in order[:int(round(fraction * len(ids)))]}
  anns = coco.get("annotations", [])
  # Annotations on unknown image ids stay in 'train', where they are reported as skipped.
  return {
      "train": {**coco, "images": [im for im in coco["images"] if im["id"] not in val],
                "annotations": [a for a in anns if a.get("image_id") not in val]},
      "validation": {**coco, "images": [im for im in coco["images"] if im["id"] in val],
                     "annotations": [a for a in anns if a.get("image_id") in val]},
  }


def _build_custom() -> None:
  if not _NAME.value:
    raise app.UsageError("--name is required (or use --synthetic)")
  annotations = _by_split(_ANNOTATIONS.value, "annotations")
  images = _by_split(_IMAGES.value, "images")
  if not annotations:
    raise app.UsageError("--annotations is required")
  if len(images) == 1 and len(annotations) > 1 and "train" in images and "=" not in _IMAGES.value[0]:
    images = {split: images["train"] for split in annotations}  # one folder for all splits
  if set(images) != set(annotations):
    raise app.UsageError(f"--images splits {sorted(images)} differ from --annotations splits "
                         f"{sorted(annotations)}")
  cocos = {split: coco_format.load_annotations(path) for split, path in annotations.items()}
  if _VALIDATION_FRACTION.value > 0:
    if len(cocos) != 1:
      raise app.UsageError("--validation_fraction needs exactly one --annotations file")
    (split, coco), = cocos.items()
    cocos = _split_by_fraction(coco, _VALIDATION_FRACTION.value, _SEED.value)
    images = {s: images[split] for s in cocos}
  splits = {split: coco_format.SplitSource(coco, coco_format.image_reader(images[split]))
            for split, coco in cocos.items()}
  builder, report = coco_format.build_tfds_dataset(
      _NAME.value, splits, data_dir=_DATA_DIR.value, box_tolerance=_BOX_TOLERANCE.value,
      strict=_STRICT.value)
  print(report.summary())
  print(f"prepared {builder.info.full_name} in {builder.data_dir}")
  print(f"use: --config.data.name={_NAME.value}"
        + (f" --config.data.data_dir={_DATA_DIR.value}" if _DATA_DIR.value else ""))


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
  name = sources.ensure_synthetic_dataset(c)
  print(f"synthetic dataset {name} ready in {time.perf_counter() - start:.1f}s "
        f"({synthetic.SyntheticConfig.from_config(c.synthetic)})")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    _build_synthetic() if _SYNTHETIC.value else _build_custom()
  except coco_format.CocoFormatError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
