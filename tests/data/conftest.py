"""Shared small datasets for the input-pipeline tests (built once per test session)."""

import pytest

from data_test_utils import THREE_IMAGES, write_images
from retinanet_jax.data import coco_format, config as config_lib, sources

@pytest.fixture(scope="session")
def three_image_config(tmp_path_factory):
  """A COCO-format dataset 'three_images' with one split 'validation' (and 'train', the same)."""
  root = tmp_path_factory.mktemp("three")
  write_images(root / "images", THREE_IMAGES)
  source = coco_format.SplitSource(THREE_IMAGES, coco_format.image_reader(root / "images"))
  coco_format.build_tfds_dataset("three_images", {"train": source, "validation": source},
                                 data_dir=str(root / "tfds"), strict=True)
  c = config_lib.default_data_config()
  c.name = "three_images"
  c.data_dir = str(root / "tfds")
  c.mode = "resize"
  c.train_min_size_range = (60, 60)
  c.eval_min_size = 60
  c.max_size = 80
  c.pad_multiple = 32
  c.max_boxes = 3
  c.hflip_prob = 0.0
  c.shuffle_buffer = 1
  c.num_parallel_calls = 1
  return c


@pytest.fixture(scope="session")
def tiny_synthetic_config(tmp_path_factory):
  """The synthetic dataset at 64x64: 48 train and 21 validation images."""
  c = config_lib.synthetic_data_config()
  c.data_dir = str(tmp_path_factory.mktemp("synthetic_tfds"))
  c.synthetic.image_size = 64
  c.synthetic.num_train = 48
  c.synthetic.num_validation = 21
  c.synthetic.min_object_size = 6.0
  c.train_min_size_range = (64, 64)
  c.eval_min_size = 64
  c.max_size = 64
  c.image_size = 64
  c.pad_multiple = 32
  c.shuffle_buffer = 16
  sources.ensure_synthetic_dataset(c)
  return c
