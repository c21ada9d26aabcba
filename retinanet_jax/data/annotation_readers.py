"""Readers of dense-scene annotation formats into COCO-format dicts (then `coco_format` as usual).

* SKU-110K (Goldman et al., CVPR 2019): one CSV file per split, no header, one row per box:
  `image_name,x1,y1,x2,y2,class,image_width,image_height` (pixels; `class` is "object").
* CARPK (Hsieh et al., ICCV 2017): one text file per image, `Annotations/<name>.txt`, one box per
  line, `x1 y1 x2 y2 class` (pixels; class 1, cars), images `Images/<name>.png`, and the split's
  image names in `ImageSets/<split>.txt`.

`read_sku110k_csv(path, images_dir, report, split=...)` and `read_carpk(path, images_dir, report,
split=...)` return a COCO-format dict (`images` with `file_name` relative to `images_dir`, `width`,
`height`; `annotations` with `bbox` `[x, y, w, h]`; `categories`), ready for
`coco_format.SplitSource` and the one-pass validation of `coco_validation` (which then decodes every
image and checks its size, boxes against the image, and so on). Problems of the file itself are added
to the same `report`, each naming the file and line, and the row is left out:
  * MALFORMED_ROW: the wrong number of columns, a non-numeric coordinate or size, an image listed
    with two different sizes;
  * EMPTY_BOX: a box with a negative or zero width or height (`x2 <= x1` or `y2 <= y1`);
  * UNKNOWN_IMAGE_FILE: a row or annotation file naming an image that is not in `images_dir`.
Image ids are 1, 2, ... in the order images first appear; annotation ids 1, 2, ... in row order.
"""

from __future__ import annotations

import csv
import io
import math

from etils import epath
from PIL import Image

from retinanet_jax.data.coco_validation import ProblemKind, Report

SKU110K_COLUMNS = ("image_name", "x1", "y1", "x2", "y2", "class", "image_width", "image_height")
CARPK_COLUMNS = ("x1", "y1", "x2", "y2", "class")
CARPK_IMAGE_SUFFIX = ".png"
CARPK_NAMES = {1: "car"}


def _numbers(values, names, where, report, split) -> list[float] | None:
  out = []
  for name, value in zip(names, values):
    try:
      number = float(value)
    except ValueError:
      number = math.nan
    if not math.isfinite(number):
      report.add(ProblemKind.MALFORMED_ROW, f"{where}: {name} {value!r} is not a finite number",
                 split=split)
      return None
    out.append(number)
  return out


def _box_ok(x1, y1, x2, y2, where, report, split) -> bool:
  if x2 <= x1 or y2 <= y1:
    report.add(ProblemKind.EMPTY_BOX, f"{where}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] has width "
               f"{x2 - x1:g} and height {y2 - y1:g} (both must be > 0)", split=split)
    return False
  return True


def _categories(names_by_id: dict[int, str]) -> list[dict]:
  return [{"id": k, "name": names_by_id[k]} for k in sorted(names_by_id)]


def read_sku110k_csv(path: str, images_dir: str, report: Report, *,
                     split: str | None = None) -> dict | None:
  """The COCO-format dict of a SKU-110K CSV file (module docstring); None when the file cannot be
  read (reported). Classes become categories 1, 2, ... in order of first appearance (SKU-110K has
  one, "object")."""
  try:
    text = epath.Path(path).read_text()
  except (OSError, UnicodeDecodeError) as e:
    report.add(ProblemKind.UNREADABLE_ANNOTATIONS, f"{path}: cannot read annotations: {e}",
               split=split, file_name=str(path))
    return None
  root = epath.Path(images_dir)
  images: dict[str, dict] = {}
  missing: set[str] = set()
  classes: dict[str, int] = {}
  annotations = []
  for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
    if not row or (len(row) == 1 and not row[0].strip()):
      continue  # blank line
    where = f"{path}:{line}"
    if len(row) != len(SKU110K_COLUMNS):
      report.add(ProblemKind.MALFORMED_ROW, f"{where}: {len(row)} columns, expected "
                 f"{len(SKU110K_COLUMNS)} ({','.join(SKU110K_COLUMNS)}): {','.join(row)!r}",
                 split=split)
      continue
    name, cls = row[0].strip(), row[5].strip()
    values = _numbers([row[i] for i in (1, 2, 3, 4, 6, 7)],
                      ("x1", "y1", "x2", "y2", "image_width", "image_height"), where, report, split)
    if values is None:
      continue
    x1, y1, x2, y2, width, height = values
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
      report.add(ProblemKind.MALFORMED_ROW, f"{where}: image size {width:g} x {height:g} is not "
                 "two positive integers", split=split, file_name=name)
      continue
    if name in missing:
      report.add(ProblemKind.UNKNOWN_IMAGE_FILE, f"{where}: image {name!r} is not in {images_dir}",
                 split=split, file_name=name)
      continue
    record = images.get(name)
    if record is None:
      if not (root / name).exists():
        missing.add(name)
        report.add(ProblemKind.UNKNOWN_IMAGE_FILE, f"{where}: image {name!r} is not in "
                   f"{images_dir}", split=split, file_name=name)
        continue
      record = {"id": len(images) + 1, "file_name": name, "width": int(width),
                "height": int(height)}
      images[name] = record
    elif (record["width"], record["height"]) != (int(width), int(height)):
      report.add(ProblemKind.MALFORMED_ROW, f"{where}: image {name!r} is {int(width)} x "
                 f"{int(height)} here but {record['width']} x {record['height']} on an earlier "
                 "row", split=split, image_id=record["id"], file_name=name)
      continue
    if not _box_ok(x1, y1, x2, y2, where, report, split):
      continue
    category = classes.setdefault(cls, len(classes) + 1)
    annotations.append({"id": len(annotations) + 1, "image_id": record["id"],
                        "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
  return {"images": list(images.values()), "annotations": annotations,
          "categories": _categories({v: k for k, v in classes.items()} or {1: "object"})}


def _carpk_names(path: str) -> tuple[list[str], epath.Path]:
  """(image names, annotations folder) of an ImageSets list file or an annotations folder."""
  p = epath.Path(path)
  if p.is_dir():
    return sorted(f.name[:-len(".txt")] for f in p.iterdir() if f.name.endswith(".txt")), p
  names = [n.strip() for n in p.read_text().splitlines() if n.strip()]
  return names, p.parent.parent / "Annotations"


def read_carpk(path: str, images_dir: str, report: Report, *, split: str | None = None,
               category_names: dict[int, str] | None = None) -> dict | None:
  """The COCO-format dict of CARPK annotations (module docstring); None when `path` cannot be read
  (reported).

  Args:
    path: a split's image list (`CARPK_devkit/data/ImageSets/train.txt`: the annotation files are
      then `../Annotations/<name>.txt` next to it) or a folder of `<name>.txt` annotation files (all
      of them).
    images_dir: the folder of `<name>.png` images.
    report: problems are added here.
    split: named in the problems.
    category_names: class number -> name (default: 1 -> "car"; others "class_<k>").
  """
  names_by_id = dict(CARPK_NAMES if category_names is None else category_names)
  try:
    names, annotations_dir = _carpk_names(path)
  except (OSError, UnicodeDecodeError) as e:
    report.add(ProblemKind.UNREADABLE_ANNOTATIONS, f"{path}: cannot read the image list: {e}",
               split=split, file_name=str(path))
    return None
  root = epath.Path(images_dir)
  images, annotations, used = [], [], set()
  for name in names:
    file_name = name + CARPK_IMAGE_SUFFIX
    ann_path = annotations_dir / f"{name}.txt"
    if not (root / file_name).exists():
      report.add(ProblemKind.UNKNOWN_IMAGE_FILE, f"{ann_path}: image {file_name!r} is not in "
                 f"{images_dir}", split=split, file_name=file_name)
      continue
    try:
      with (root / file_name).open("rb") as f, Image.open(f) as im:  # the header only
        width, height = im.size
    except (OSError, ValueError) as e:
      report.add(ProblemKind.UNDECODABLE_IMAGE, f"{root / file_name}: not a decodable image: {e}",
                 split=split, file_name=file_name)
      continue
    try:
      lines = ann_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
      report.add(ProblemKind.UNREADABLE_ANNOTATIONS, f"{ann_path}: cannot read annotations: {e}",
                 split=split, file_name=str(ann_path))
      continue
    record = {"id": len(images) + 1, "file_name": file_name, "width": width, "height": height}
    images.append(record)
    for line, text in enumerate(lines, start=1):
      fields = text.split()
      if not fields:
        continue
      where = f"{ann_path}:{line}"
      if len(fields) != len(CARPK_COLUMNS):
        report.add(ProblemKind.MALFORMED_ROW, f"{where}: {len(fields)} columns, expected "
                   f"{len(CARPK_COLUMNS)} ({' '.join(CARPK_COLUMNS)}): {text.strip()!r}",
                   split=split, image_id=record["id"], file_name=file_name)
        continue
      values = _numbers(fields, CARPK_COLUMNS, where, report, split)
      if values is None:
        continue
      x1, y1, x2, y2, cls = values
      if cls != int(cls):
        report.add(ProblemKind.MALFORMED_ROW, f"{where}: class {fields[4]!r} is not an integer",
                   split=split, image_id=record["id"], file_name=file_name)
        continue
      if not _box_ok(x1, y1, x2, y2, where, report, split):
        continue
      used.add(int(cls))
      annotations.append({"id": len(annotations) + 1, "image_id": record["id"],
                          "category_id": int(cls), "bbox": [x1, y1, x2 - x1, y2 - y1],
                          "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
  for k in used | set(names_by_id):
    names_by_id.setdefault(k, f"class_{k}")
  return {"images": images, "annotations": annotations, "categories": _categories(names_by_id)}
