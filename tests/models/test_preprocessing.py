"""Input normalization and torchvision-identical resizing/padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from retinanet_jax.models import preprocessing

normalize = jax.jit(preprocessing.normalize_images, static_argnames=("convention", "dtype"))


def test_torchvision_normalization_and_padding_match_generalized_rcnn_transform():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (37, 50, 3), dtype=np.uint8),
            rng.integers(0, 256, (45, 29, 3), dtype=np.uint8)]
  transform = GeneralizedRCNNTransform(37, 1000, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                                       size_divisible=32).eval()
  # min_size=37 < 45: the second image would be resized; use the normalizing and batching steps only.
  tensors = [torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images]
  expected = transform.batch_images([transform.normalize(t) for t in tensors], size_divisible=32)
  batch, image_hw = preprocessing.batch_images(images, dtype=np.uint8)
  assert batch.shape == (2, 64, 64, 3) and batch.dtype == np.uint8
  np.testing.assert_array_equal(image_hw, [[37, 50], [45, 29]])
  got = normalize(batch, image_hw)
  np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), atol=1e-6)
  assert float(jnp.abs(got[1, 45:]).max()) == 0.0 and float(jnp.abs(got[1, :, 29:]).max()) == 0.0


def test_caffe_conventions_golden():
  images = np.zeros((1, 2, 3, 3), np.uint8)
  images[0, 0, 0] = (255, 0, 0)  # pure red, RGB
  image_hw = np.array([[1, 2]], np.int32)  # row 1 and column 2 are padding
  caffe = normalize(images, image_hw, convention="caffe")
  np.testing.assert_allclose(caffe[0, 0, 0], [-103.530, -116.280, 255 - 123.675], rtol=1e-6)  # BGR
  np.testing.assert_allclose(caffe[0, 0, 1], [-103.530, -116.280, -123.675], rtol=1e-6)
  np.testing.assert_array_equal(caffe[0, 1], 0.0)
  np.testing.assert_array_equal(caffe[0, 0, 2], 0.0)
  fair = normalize(images, image_hw, convention="caffe_fair")
  np.testing.assert_allclose(fair[0, 0, 0], [-103.530 / 57.375, -116.280 / 57.120,
                                             (255 - 123.675) / 58.395], rtol=1e-6)
  # Float input on the 0-255 scale gives the same result as uint8.
  np.testing.assert_array_equal(normalize(images.astype(np.float32), image_hw, convention="caffe"),
                                caffe)
  assert normalize(images, image_hw, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_normalize_errors():
  with pytest.raises(ValueError, match="input convention must be one of"):
    preprocessing.normalize_images(np.zeros((1, 4, 4, 3)), np.ones((1, 2)), convention="tf")
  with pytest.raises(ValueError, match=r"image_hw must be \[B, 2\]"):
    preprocessing.normalize_images(np.zeros((2, 4, 4, 3)), np.ones((1, 2)))


@pytest.mark.parametrize("size, new_size", [((477, 720), (800, 1207)), ((301, 407), (800, 1081)),
                                            ((64, 1000), (85, 1333)), ((333, 333), (800, 800)),
                                            ((17, 23), (800, 1082)), ((1000, 700), (1142, 800))])
def test_resized_size_matches_torchvision(size, new_size):
  transform = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
  resized, _ = transform.resize(torch.zeros((3,) + size))
  assert tuple(resized.shape[-2:]) == new_size
  assert preprocessing.torchvision_resized_size(*size) == new_size


@pytest.mark.parametrize("size, new_size", [((48, 64), (80, 107)), ((61, 47), (30, 23)),
                                            ((477, 720), (800, 1207)),
                                            ((5, 9), (13, 4)), ((20, 30), (20, 30))])
def test_resize_bilinear_matches_pytorch(size, new_size):
  image = np.random.default_rng(0).uniform(0, 255, size + (3,)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=new_size,
                           mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
  got = preprocessing.resize_bilinear(image, new_size)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=6e-5)  # 2 float32 ulps on a 0-255 scale
