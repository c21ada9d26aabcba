"""The `data` section of a training config: every field the input pipeline reads.

`configs/*.py` start from `default_data_config()` (the paper's COCO setting) or from
`synthetic_data_config()` (the built-in synthetic dataset of the README's main command) and change a
few fields.
"""

from __future__ import annotations

import ml_collections

from retinanet_jax.data import synthetic


def default_data_config() -> ml_collections.ConfigDict:
  """COCO 2017 with the paper's input: short side 800, long side at most 1333, horizontal flip."""
  c = ml_collections.ConfigDict()

  # --- Source ---------------------------------------------------------------------------------
  # TFDS dataset name: "coco/2017"; "synthetic" (the built-in dataset, built on first use by
  # `ensure_synthetic_dataset`); or the NAME given to scripts/prepare_dataset.py.
  c.name = "coco/2017"
  # Folder holding prepared TFDS datasets (local or a bucket, e.g. "gs://my-bucket/tfds").
  # None: TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR). (A typed placeholder, so that
  # --config.data.data_dir=... works on the command line.)
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.train_split = "train"
  # Any TFDS split string works, e.g. "validation[:500]" for quick evaluations.
  c.eval_split = "validation"
  # TFDS coco/2017 only: path of instances_val2017.json. When set, evaluation ground truth is read
  # from it (restricted to the eval split's images); when None it is rebuilt from the TFDS split
  # (boxes then carry TFDS's float32 rounding, < 0.01 px). Datasets made by prepare_dataset.py
  # always use the ground-truth JSON stored with them and ignore this field.
  c.eval_annotations = ml_collections.config_dict.placeholder(str)

  # --- Geometry -------------------------------------------------------------------------------
  # "resize": short side S, long side at most max_size, padded to a square of side
  #   ceil(max_size / pad_multiple) * pad_multiple (the paper, torchvision, detectron2).
  # "lsj": large-scale jitter: resize so the image fits image_size * s (s ~ U(scale_range)),
  #   random crop or pad to image_size x image_size (rounded up to pad_multiple).
  c.mode = "resize"
  # resize: training S is a uniform integer in [lo, hi]; (800, 800) is the paper's fixed scale,
  # (640, 800) the common multi-scale schedule.
  c.train_min_size_range = (800, 800)
  c.eval_min_size = 800
  c.max_size = 1333
  # lsj: output side and scale range (the LSJ paper: 1024 and (0.1, 2.0)).
  c.image_size = 640
  c.scale_range = (0.1, 2.0)
  # Padded height and width are multiples of this (128 = the largest FPN stride, P7).
  c.pad_multiple = 128
  c.hflip_prob = 0.5
  # Ground-truth slots per image (COCO has at most 93 boxes per training image).
  c.max_boxes = 100
  # After resizing/cropping, boxes whose width or height is <= this (pixels) are dropped and counted.
  c.min_box_side = 0.0

  # --- tf.data --------------------------------------------------------------------------------
  c.shuffle_buffer = 1024  # examples (still JPEG-encoded, so ~160 KiB each for COCO)
  c.seed = 0
  # True: every host reads the whole training split in one shuffled order and keeps its rows of each
  # global batch (before decoding), so the batches of a step do not depend on the process count and a
  # checkpoint resumes exactly on any number of hosts; each host then reads (not decodes) every record.
  # False: each host reads its own part of the split with its own seed (reads 1/process_count).
  c.global_shuffle = True
  # True: the same seed gives the same batches, and iterator state restores exactly.
  # False: tf.data may reorder elements for speed (resume is then only approximately exact).
  c.deterministic = True
  c.prefetch = 2  # batches
  c.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE
  # Threads of tf.data's private pool; 0: share TF's global pool (all cores).
  c.private_threadpool_size = 0

  # --- Built-in synthetic dataset (used when name == "synthetic") -----------------------------
  c.synthetic = synthetic.SyntheticConfig().to_config_dict()
  return c


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
