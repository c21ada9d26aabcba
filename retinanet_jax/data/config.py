"""The `data` section of a training config: every field the input pipeline reads.

`DataConfig` is the typed section (built once from the command line's `ConfigDict` by
`retinanet_jax.config.Config.from_config_dict`, validated there); the pipeline's functions read its
attributes (a `ConfigDict` with the same fields also works, for notebooks and tests).
`configs/*.py` start from `default_data_config()` (the paper's COCO setting) or from
`synthetic_data_config()` (the built-in synthetic dataset of the README's main command) and change a
few fields.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from retinanet_jax.runtime import typed_config
from retinanet_jax.data import synthetic

MODES = ("resize", "lsj", "fixed")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Input of training and evaluation (defaults: COCO 2017 with the paper's input: short side 800,
  long side at most 1333, horizontal flip).

  Source:
    name: TFDS dataset name: "coco/2017"; "synthetic" (the built-in dataset, built on first use by
      `ensure_synthetic_dataset`); or the NAME given to scripts/prepare_dataset.py.
    data_dir: folder holding prepared TFDS datasets (local or a bucket, e.g. "gs://my-bucket/tfds");
      None: TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    train_split, eval_split: TFDS split strings, e.g. "validation[:500]" for quick evaluations.
    eval_annotations: TFDS coco/2017 only: path of instances_val2017.json. When set, evaluation
      ground truth is read from it (restricted to the eval split's images); when None it is rebuilt
      from the TFDS split (boxes then carry TFDS's float32 rounding, < 0.01 px). Datasets made by
      prepare_dataset.py always use the ground-truth JSON stored with them.

  Geometry:
    mode: "resize": short side S, long side at most max_size, padded to a square of side
      ceil(max_size / pad_multiple) * pad_multiple (the paper, torchvision, detectron2). "lsj":
      large-scale jitter: resize so the image fits image_size * s (s ~ U(scale_range)), random crop
      or pad to image_size x image_size (rounded up to pad_multiple). "fixed": every image resized to
      image_size x image_size without keeping its aspect ratio (boxes scaled per axis, mapped back
      per axis for evaluation; mmdetection's keep_ratio=False, SARDet-100K's 800x800); training
      augmentation is the horizontal flip only.
    train_min_size_range: resize: training S is a uniform integer in [lo, hi]; (800, 800) is the
      paper's fixed scale, (640, 800) the common multi-scale schedule.
    eval_min_size, max_size: resize: evaluation S, and the long side's limit.
    image_size, scale_range: lsj: output side and scale range (the LSJ paper: 1024, (0.1, 2.0));
      fixed: the output side (scale_range unused).
    pad_multiple: padded height and width are multiples of this (128 = the largest FPN stride).
    hflip_prob: probability of a horizontal flip in training.
    max_boxes: ground-truth slots per image (COCO has at most 93 boxes per training image).
    min_box_side: after resizing/cropping, boxes whose width or height is <= this (pixels) are
      dropped and counted.

  tf.data:
    shuffle_buffer: examples (still JPEG-encoded, so ~160 KiB each for COCO).
    seed: the input's seed.
    global_shuffle: True: every host reads the whole training split in one shuffled order and keeps
      its rows of each global batch (before decoding), so the batches of a step do not depend on
      the process count and a checkpoint resumes exactly on any number of hosts; each host then
      reads (not decodes) every record. False: each host reads its own part of the split with its
      own seed (reads 1/process_count).
    deterministic: True: the same seed gives the same batches, and iterator state restores
      exactly. False: tf.data may reorder elements for speed (resume only approximately exact).
    prefetch: batches.
    num_parallel_calls: -1: tf.data.AUTOTUNE.
    private_threadpool_size: threads of tf.data's private pool; 0: share TF's global pool.

  synthetic: the built-in synthetic dataset's knobs (used when name == "synthetic").
  """

  name: str = "coco/2017"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "validation"
  eval_annotations: str | None = None
  mode: str = dataclasses.field(default="resize", metadata={"choices": MODES})
  train_min_size_range: tuple[int, int] = (800, 800)
  eval_min_size: int = 800
  max_size: int = 1333
  image_size: int = 640
  scale_range: tuple[float, float] = (0.1, 2.0)
  pad_multiple: int = 128
  hflip_prob: float = 0.5
  max_boxes: int = 100
  min_box_side: float = 0.0
  shuffle_buffer: int = 1024
  seed: int = 0
  global_shuffle: bool = True
  deterministic: bool = True
  prefetch: int = 2
  num_parallel_calls: int = -1
  private_threadpool_size: int = 0
  synthetic: synthetic.SyntheticConfig = synthetic.SyntheticConfig()

  def __post_init__(self):
    lo, hi = self.train_min_size_range
    if not 0 < lo <= hi:
      raise ValueError(f"train_min_size_range must be 0 < lo <= hi, got {(lo, hi)}")
    slo, shi = self.scale_range
    if not 0 < slo <= shi:
      raise ValueError(f"scale_range must be 0 < lo <= hi, got {(slo, shi)}")
    if self.pad_multiple < 1 or self.max_boxes < 1:
      raise ValueError(f"pad_multiple and max_boxes must be >= 1, got {self.pad_multiple}, "
                       f"{self.max_boxes}")

  def to_config_dict(self) -> ml_collections.ConfigDict:
    return typed_config.to_config_dict(self)


def default_data_config() -> ml_collections.ConfigDict:
  """COCO 2017 with the paper's input (`DataConfig`'s defaults), as a `ConfigDict`."""
  return DataConfig().to_config_dict()


def synthetic_data_config() -> ml_collections.ConfigDict:
  """The built-in synthetic dataset at its native size (no rescaling), flips on."""
  c = default_data_config()
  c.name = "synthetic"
  size = c.synthetic.image_size
  c.mode = "resize"
  c.train_min_size_range = (size, size)
  c.eval_min_size = size
  c.max_size = size
  c.image_size = size
  c.scale_range = (0.75, 1.25)
  c.pad_multiple = 32 if size % 128 else 128
  c.max_boxes = 32
  c.shuffle_buffer = 2048
  return c
