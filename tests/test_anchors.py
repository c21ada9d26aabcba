"""anchors.py against torchvision's AnchorGenerator and hand-computed values."""

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from retinanet_jax import anchors as anchor_lib


def torchvision_anchors(image_size):
  sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
  generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
  h, w = image_size
  feats = [torch.zeros(1, 1, -(-h // 2**l), -(-w // 2**l)) for l in range(3, 8)]
  images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
  return generator(images, feats)[0].numpy()


@pytest.mark.parametrize("image_size", [(640, 640), (512, 768), (800, 1344), (200, 328)])
def test_torchvision_convention_equals_torchvision(image_size):
  ours = anchor_lib.generate_anchors(image_size)
  ref = torchvision_anchors(image_size)
  assert ours.boxes.shape == ref.shape and ours.boxes.dtype == np.float32
  np.testing.assert_array_equal(ours.boxes, ref)
  assert sum(ours.level_counts) == ref.shape[0] == anchor_lib.num_anchors(image_size)


def test_counts_and_golden_cells():
  a = anchor_lib.generate_anchors((640, 640))
  assert a.num_anchors == 76725
  assert a.level_shapes == ((80, 80), (40, 40), (20, 20), (10, 10), (5, 5))
  assert a.level_offsets[-1] == 76725 and a.num_per_location == 9
  # torchvision sizes on P3: 32, int(40.3) = 40, int(50.8) = 50; ratio 1 anchors are squares.
  np.testing.assert_array_equal(a.boxes[3:6], [[-16, -16, 16, 16], [-20, -20, 20, 20], [-25, -25, 25, 25]])
  # Second cell of P3 is shifted by the stride 8 in x.
  np.testing.assert_array_equal(a.boxes[9 + 3], [8 - 16, -16, 8 + 16, 16])


def test_detectron2_and_tf_conventions():
  d2 = anchor_lib.generate_anchors((256, 256), config=anchor_lib.AnchorConfig(convention="detectron2"))
  tf = anchor_lib.generate_anchors((256, 256), config=anchor_lib.AnchorConfig(convention="tf"))
  size = 32 * 2 ** (1 / 3)
  # Ratio 1 (index 1), scale 1 (index 1): a float-sized square centred on (0, 0) or (4, 4).
  np.testing.assert_allclose(d2.boxes[4], [-size / 2, -size / 2, size / 2, size / 2], rtol=1e-6)
  np.testing.assert_allclose(tf.boxes[4], [4 - size / 2, 4 - size / 2, 4 + size / 2, 4 + size / 2],
                             rtol=1e-6)
  # Ratio 0.5 (h/w): wider than tall, area kept.
  w = d2.boxes[0, 2] - d2.boxes[0, 0]
  h = d2.boxes[0, 3] - d2.boxes[0, 1]
  np.testing.assert_allclose([w * h, h / w], [32.0**2, 0.5], rtol=1e-5)
  assert d2.level_strides[-1] == (128, 128)


def test_bad_config_and_size():
  with pytest.raises(ValueError, match="convention"):
    anchor_lib.AnchorConfig(convention="mmdet")
  with pytest.raises(ValueError, match="image_size"):
    anchor_lib.generate_anchors((640,))
  with pytest.raises(ValueError, match="min_level"):
    anchor_lib.AnchorConfig(min_level=5, max_level=4)
