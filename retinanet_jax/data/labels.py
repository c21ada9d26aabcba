"""Label maps: contiguous class index <-> dataset category id and name.

The network predicts `K` foreground classes indexed `0..K-1` ("labels"). Datasets name their classes
with their own category ids (COCO: 80 ids in 1..90 with gaps) and names. A `LabelMap` is the
bijection between the two; evaluation uses it to write detections with dataset category ids, and every
training run saves it next to its checkpoints (`save_label_map(label_map, workdir / "label_map.json")`)
so that a checkpoint can always be read back with the right names.

Invariant: `label_map.to_label(label_map.to_category_id(k)) == k` for every `k` in `0..K-1`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

# COCO 2017 detection categories in id order, as listed in instances_{train,val}2017.json. TFDS's
# coco/2017 ClassLabel uses the same order, so TFDS label k is COCO_CATEGORIES[k].
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"),
    (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"),
    (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)


@dataclasses.dataclass(frozen=True)
class LabelMap:
  """Contiguous labels `0..K-1` <-> dataset category ids and names.

  Attributes:
    category_ids: `category_ids[k]` is the dataset category id of label `k`; unique.
    names: `names[k]` is the human-readable name of label `k`.
  """

  category_ids: tuple[int, ...]
  names: tuple[str, ...]

  def __post_init__(self):
    if len(self.category_ids) != len(self.names):
      raise ValueError(
          f"category_ids and names must have the same length, got {len(self.category_ids)} and "
          f"{len(self.names)}")
    if len(set(self.category_ids)) != len(self.category_ids):
      raise ValueError(f"category_ids must be unique, got {self.category_ids}")

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  def to_category_id(self, label: int) -> int:
    return self.category_ids[label]

  def to_label(self, category_id: int) -> int:
    try:
      return self.category_ids.index(category_id)
    except ValueError:
      raise KeyError(f"category id {category_id} is not in the label map "
                     f"{self.category_ids}") from None

  def coco_categories(self) -> list[dict]:
    """The `categories` list of a COCO-format JSON dict."""
    return [{"id": int(c), "name": n} for c, n in zip(self.category_ids, self.names)]

  def to_json(self) -> dict:
    return {"labels": [{"label": k, "category_id": int(c), "name": n}
                       for k, (c, n) in enumerate(zip(self.category_ids, self.names))]}

  @classmethod
  def from_json(cls, obj: dict) -> "LabelMap":
    rows = sorted(obj["labels"], key=lambda r: r["label"])
    if [r["label"] for r in rows] != list(range(len(rows))):
      raise ValueError(f"label map labels must be 0..K-1, got {[r['label'] for r in rows]}")
    return cls(tuple(int(r["category_id"]) for r in rows), tuple(str(r["name"]) for r in rows))

  @classmethod
  def from_categories(cls, categories: Sequence[dict]) -> "LabelMap":
    """From a COCO `categories` list; labels follow increasing category id."""
    ordered = sorted(categories, key=lambda c: int(c["id"]))
    return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c["name"]) for c in ordered))


COCO_LABEL_MAP = LabelMap(tuple(c for c, _ in COCO_CATEGORIES), tuple(n for _, n in COCO_CATEGORIES))


def save_label_map(label_map: LabelMap, path: str) -> None:
  """Writes `label_map` as JSON to `path` (local or any tf.io.gfile file system)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  # only for gfile paths
  with tf.io.gfile.GFile(str(path), "w") as f:
    json.dump(label_map.to_json(), f, indent=1)


def load_label_map(path: str) -> LabelMap:
  """Reads a label map written by `save_label_map`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  # only for gfile paths
  with tf.io.gfile.GFile(str(path), "r") as f:
    return LabelMap.from_json(json.load(f))
