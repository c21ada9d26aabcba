"""Dataset sources: every dataset read as one example format.

Two kinds of TFDS datasets are read:
* `TFDS_COCO`: TFDS's own `coco/2017` (boxes normalized `[ymin, xmin, ymax, xmax]`, 80 contiguous
  labels in COCO category-id order);
* `COCO_FORMAT`: datasets written by `coco_format.build_tfds_dataset` (scripts/prepare_dataset.py
  and the built-in synthetic dataset): boxes in pixels, a label map and ground truth stored with them.

Example (one image, from `decode_example` / `load_examples`), with `N` its number of objects:
  image        uint8 [H, W, 3]   RGB as stored
  boxes        float32 [N, 4]    [x1, y1, x2, y2] in original pixels
  labels       int32 [N]         contiguous class index 0..K-1 (see `label_map`)
  is_crowd     bool [N]
  image_id     int64 []          dataset image id
  original_hw  int32 [2]         (H, W)

Reading keeps the image encoded (`read_split`) so that shuffling moves bytes, not pixels;
`decode_example` decodes it after shuffling.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from retinanet_jax.data import coco_format, synthetic
from retinanet_jax.data.labels import COCO_LABEL_MAP, LabelMap

SYNTHETIC_NAME = "synthetic"
SYNTHETIC_TFDS_NAME = "retinanet_synthetic"


class DatasetKind(enum.Enum):
  TFDS_COCO = "tfds_coco"
  COCO_FORMAT = "coco_format"


# ------------------------------------------------------------------------------------------------
# Opening datasets.

def synthetic_config(data_config: ml_collections.ConfigDict) -> synthetic.SyntheticConfig:
  return synthetic.SyntheticConfig.from_config(data_config.synthetic)


def tfds_name(data_config: ml_collections.ConfigDict) -> str:
  """The TFDS name read for `data_config.name`; "synthetic" names the config's fingerprint."""
  if data_config.name == SYNTHETIC_NAME:
    config = synthetic_config(data_config)
    return f"{SYNTHETIC_TFDS_NAME}/s{config.image_size}_{config.fingerprint()}"
  return data_config.name


def open_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  name = tfds_name(data_config)
  try:
    return tfds.builder(name, data_dir=data_config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    hint = (" (call ensure_synthetic_dataset(data_config) first)"
            if data_config.name == SYNTHETIC_NAME else
            " (prepare it with scripts/prepare_dataset.py, or set data.data_dir)")
    raise FileNotFoundError(f"dataset {name!r} not found in data_dir "
                            f"{data_config.data_dir or 'default'}{hint}: {e}") from None


def dataset_kind(builder: tfds.core.DatasetBuilder) -> DatasetKind:
  if coco_format.is_coco_format(builder):
    return DatasetKind.COCO_FORMAT
  features = builder.info.features
  if "objects" in features.keys() and "bbox" in features["objects"].feature.keys():
    return DatasetKind.TFDS_COCO
  raise ValueError(f"{builder.info.full_name}: expected TFDS coco features (objects/bbox) or a "
                   f"dataset from prepare_dataset.py (objects/bbox_xyxy), got {features}")


def label_map(data_config: ml_collections.ConfigDict) -> LabelMap:
  """Contiguous labels <-> dataset category ids and names for the configured dataset."""
  builder = open_builder(data_config)
  if dataset_kind(builder) == DatasetKind.TFDS_COCO:
    names = builder.info.features["objects"]["label"].names
    real_names = [n.replace("_", " ") for n in names if not n.isdigit()]
    if real_names and real_names != list(COCO_LABEL_MAP.names):
      raise ValueError(f"{builder.info.full_name}: label names {names[:5]}... differ from COCO "
                       "2017's; cannot map them to COCO category ids")
    return COCO_LABEL_MAP
  return LabelMap.from_json(json.loads(
      coco_format.read_dataset_file(builder, coco_format.LABEL_MAP_FILE)))


# ------------------------------------------------------------------------------------------------
# Reading and decoding.

def num_examples(builder: tfds.core.DatasetBuilder, split) -> int:
  """Examples in `split` (a split string or a tfds sub-split such as split_for_jax_process's)."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError, AttributeError):
    # Unknown split metadata (e.g. under tfds.testing.mock_data): ask tf.data.
    cardinality = int(read_split(builder, split, shuffle_files=False).cardinality())
    if cardinality < 0:
      raise ValueError(f"cannot count the examples of {split!r} in "
                       f"{builder.info.full_name}") from None
    return cardinality


def read_split(builder: tfds.core.DatasetBuilder, split, *, shuffle_files: bool,
               seed: int | None = None,
               options: tf.data.Options | None = None) -> tf.data.Dataset:
  """Raw TFDS records with the image still encoded (tf.string)."""
  read_config = tfds.ReadConfig(
      shuffle_seed=seed, shuffle_reshuffle_each_iteration=True, try_autocache=False,
      skip_prefetch=True, options=options)
  return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})


def select_fields(record: dict, kind: DatasetKind) -> dict:
  """Keeps only what decode_example needs (smaller shuffle buffers and checkpoints)."""
  objects = record["objects"]
  box_key = "bbox_xyxy" if kind == DatasetKind.COCO_FORMAT else "bbox"
  return {"image": record["image"], "image/id": record["image/id"],
          "boxes": objects[box_key], "labels": objects["label"],
          "is_crowd": objects["is_crowd"]}


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3] (grey and RGBA converted to RGB)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, 3])
  return image


def encoded_image_hw(encoded: tf.Tensor) -> tf.Tensor:
  """(H, W) int32 of encoded bytes; JPEG headers are read without decoding the pixels."""
  return tf.cond(tf.io.is_jpeg(encoded),
                 lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                 lambda: tf.shape(decode_image(encoded))[:2])


def decode_example(fields: dict, kind: DatasetKind) -> dict:
  """select_fields output -> Example (see the module docstring)."""
  image = decode_image(fields["image"])
  hw = tf.shape(image)[:2]
  boxes = tf.reshape(tf.cast(fields["boxes"], tf.float32), [-1, 4])
  if kind == DatasetKind.TFDS_COCO:  # normalized [ymin, xmin, ymax, xmax] -> pixels [x1, y1, x2, y2]
    h, w = tf.cast(hw[0], tf.float32), tf.cast(hw[1], tf.float32)
    boxes = tf.gather(boxes, [1, 0, 3, 2], axis=1) * tf.stack([w, h, w, h])
  return {
      "image": image,
      "boxes": boxes,
      "labels": tf.cast(fields["labels"], tf.int32),
      "is_crowd": tf.cast(fields["is_crowd"], tf.bool),
      "image_id": tf.cast(fields["image/id"], tf.int64),
      "original_hw": tf.cast(hw, tf.int32),
  }


def load_examples(data_config: ml_collections.ConfigDict, split: str) -> tf.data.Dataset:
  """Every example of `split` in stored order, decoded to the Example format (no augmentation)."""
  builder = open_builder(data_config)
  kind = dataset_kind(builder)
  ds = read_split(builder, split, shuffle_files=False)
  return ds.map(lambda r: decode_example(select_fields(r, kind), kind))


# ------------------------------------------------------------------------------------------------
# Evaluation ground truth.

def coco_ground_truth(data_config: ml_collections.ConfigDict) -> dict:
  """COCO-format ground truth of `data_config.eval_split`, original pixels, dataset category ids.

  * Datasets from prepare_dataset.py / synthetic: the stored ground_truth_{split}.json, restricted
    to the images of the eval split when it is a sub-split such as "validation[:100]".
  * TFDS coco/2017 with `data_config.eval_annotations` (instances_val2017.json): that file,
    restricted to the eval split's images.
  * TFDS coco/2017 otherwise: rebuilt from the TFDS split itself (image sizes from the JPEG headers,
    boxes from TFDS's normalized float32 boxes, TFDS's integer `area`); annotation ids 1..N with the
    TFDS object id kept as `source_id`.
  """
  builder = open_builder(data_config)
  kind = dataset_kind(builder)
  split = data_config.eval_split
  if kind == DatasetKind.COCO_FORMAT:
    split_name = split.split("[")[0].strip()
    if "+" in split:
      raise ValueError(f"eval_split must be one split or a slice of one, got {split!r}")
    gt = json.loads(coco_format.read_dataset_file(builder, coco_format.ground_truth_file(
        split_name)))
    return gt if split == split_name else _restrict(gt, _split_image_ids(builder, split))
  if data_config.eval_annotations:
    gt = coco_format.load_annotations(data_config.eval_annotations)
    return _restrict(gt, _split_image_ids(builder, split))
  return _ground_truth_from_tfds(builder, split)


def _split_image_ids(builder, split) -> set[int]:
  ds = read_split(builder, split, shuffle_files=False).map(lambda r: r["image/id"])
  return {int(i) for i in ds.as_numpy_iterator()}


def _restrict(gt: dict, image_ids: set[int]) -> dict:
  return {**gt, "images": [im for im in gt["images"] if im["id"] in image_ids],
          "annotations": [a for a in gt.get("annotations", []) if a["image_id"] in image_ids]}


def _ground_truth_from_tfds(builder, split) -> dict:
  def fields(r):
    o = r["objects"]
    return {"id": r["image/id"], "filename": r["image/filename"],
            "hw": encoded_image_hw(r["image"]), "bbox": o["bbox"], "label": o["label"],
            "is_crowd": o["is_crowd"], "area": o["area"], "object_id": o["id"]}
  ds = read_split(builder, split, shuffle_files=False).map(fields)
  images, annotations = [], []
  category_ids = COCO_LABEL_MAP.category_ids
  for r in ds.as_numpy_iterator():
    h, w = (int(v) for v in r["hw"])
    images.append({"id": int(r["id"]), "height": h, "width": w,
                   "file_name": r["filename"].decode()})
    for (ymin, xmin, ymax, xmax), label, crowd, area, oid in zip(
        r["bbox"].tolist(), r["label"].tolist(), r["is_crowd"].tolist(), r["area"].tolist(),
        r["object_id"].tolist()):
      x, y, bw, bh = xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h
      annotations.append({"id": len(annotations) + 1, "source_id": oid, "image_id": int(r["id"]),
                          "category_id": category_ids[label], "bbox": [x, y, bw, bh],
                          "area": float(area), "iscrowd": int(crowd)})
  return {"info": {"description": f"rebuilt from TFDS {builder.info.full_name} {split}"},
          "images": images, "annotations": annotations,
          "categories": COCO_LABEL_MAP.coco_categories()}


# ------------------------------------------------------------------------------------------------
# The built-in synthetic dataset.

def ensure_synthetic_dataset(data_config: ml_collections.ConfigDict) -> str:
  """Builds the synthetic TFDS dataset of `data_config.synthetic` unless present; returns its name.

  Idempotent. Concurrency: in a multi-process JAX job, process 0 builds first and every process
  waits at a barrier; a process that still cannot see the dataset afterwards (data_dir on a local,
  non-shared disk) builds its own identical copy. Processes on one machine serialize on a lock
  file in data_dir, and TFDS renames a finished dataset into place atomically, so a reader never
  sees half a dataset.
  """
  import jax  # local: keeps this module importable in tf.data-only tools

  if data_config.name != SYNTHETIC_NAME:
    raise ValueError(f"data.name must be {SYNTHETIC_NAME!r}, got {data_config.name!r}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # local, as jax above
    if jax.process_index() == 0:
      _build_synthetic_locked(data_config)
    multihost_utils.sync_global_devices("retinanet_jax.ensure_synthetic_dataset")
  _build_synthetic_locked(data_config)
  return tfds_name(data_config)


def _synthetic_is_prepared(data_config) -> bool:
  try:
    open_builder(data_config)
    return True
  except FileNotFoundError:
    return False


def _build_synthetic_locked(data_config) -> None:
  if _synthetic_is_prepared(data_config):
    return
  data_dir = epath.Path(data_config.data_dir or tfds.core.constants.DATA_DIR).expanduser()
  data_dir.mkdir(parents=True, exist_ok=True)
  if "://" in os.fspath(data_dir):  # a bucket: no file locks; process 0 built it (see above)
    build_synthetic_dataset(synthetic_config(data_config), data_dir=os.fspath(data_dir))
    return
  lock_path = os.fspath(data_dir / f".{SYNTHETIC_TFDS_NAME}.lock")
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not _synthetic_is_prepared(data_config):
        build_synthetic_dataset(synthetic_config(data_config), data_dir=os.fspath(data_dir))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def build_synthetic_dataset(config: synthetic.SyntheticConfig, *, data_dir: str | None):
  """Renders and stores the synthetic dataset (train, validation); returns (builder, report)."""
  sources = {}
  for split, (coco, encoded) in synthetic.make_coco_splits(config).items():
    sources[split] = coco_format.SplitSource(
        annotations=coco, read_image=lambda record, encoded=encoded: encoded[record["id"]])
  return coco_format.build_tfds_dataset(
      SYNTHETIC_TFDS_NAME, sources, data_dir=data_dir,
      config=f"s{config.image_size}_{config.fingerprint()}", strict=True,
      description=f"retinanet_jax synthetic shapes, {config}")
