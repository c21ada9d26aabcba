"""Input normalization on device, and torchvision's inference resizing on the host.

On device, `normalize_images(images [B, H, W, 3], image_hw [B, 2], *, convention)` turns RGB pixels on
the 0-255 scale (uint8 from the input pipeline, or float) into the network's input and zeroes the
padded region after normalization, as torchvision pads after normalizing (docs/design.md):

| convention   | channels | pixel scale | mean                        | std                        | weights   |
|--------------|----------|-------------|-----------------------------|----------------------------|-----------|
| `torchvision`| RGB      | x / 255     | (0.485, 0.456, 0.406)       | (0.229, 0.224, 0.225)      | torchvision, ImageNet |
| `caffe`      | BGR      | x           | (103.530, 116.280, 123.675) | (1, 1, 1)                  | MSRA R-50/R-101, detectron2 R-50/R-101 |
| `caffe_fair` | BGR      | x           | (103.530, 116.280, 123.675) | (57.375, 57.120, 58.395)   | FAIR X-101-32x8d, detectron2 X-101 |

On the host (NumPy), `torchvision_resized_size`, `resize_bilinear` and `batch_images` reproduce
torchvision's `GeneralizedRCNNTransform` at inference: resize so that the short side is `min_size` (800)
unless the long side would exceed `max_size` (1333), with the output size `floor(size * factor)` and
PyTorch's bilinear interpolation (`align_corners=False`, no antialiasing, float32), then zero-pad the
batch at the bottom/right to a multiple of `size_divisible`. torchvision pads to multiples of 32; the
training pipeline pads to multiples of 128 so that all five pyramid levels tile the image exactly and all
anchor conventions agree. (torchvision normalizes before resizing and we after; both steps are linear,
so the results agree up to float rounding.)

Shapes: `B` images, `H, W` padded size, `h, w` one image's size.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class InputConvention:
  """`y = (x[channels] / pixel_divisor - mean) / std` per channel, mean and std in network order."""

  channel_order: str  # 'rgb' or 'bgr': the order the network expects
  pixel_divisor: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


CONVENTIONS = {
    "torchvision": InputConvention("rgb", 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "caffe": InputConvention("bgr", 1.0, (103.530, 116.280, 123.675), (1.0, 1.0, 1.0)),
    "caffe_fair": InputConvention("bgr", 1.0, (103.530, 116.280, 123.675), (57.375, 57.120, 58.395)),
}


def get_convention(convention: str) -> InputConvention:
  if convention not in CONVENTIONS:
    raise ValueError(f"input convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
  return CONVENTIONS[convention]


def normalize_images(images, image_hw, *, convention: str = "torchvision", dtype=jnp.float32):
  """Normalized network input from RGB pixels; padded pixels become exactly 0.

  Args:
    images: uint8 (or float, 0-255 scale) `[B, H, W, 3]`, RGB, valid pixels at the top-left.
    image_hw: int `[B, 2]`, valid height and width of each image.
    convention: a key of `CONVENTIONS`.
    dtype: dtype of the result.

  Returns:
    `[B, H, W, 3]` of `dtype`, in the channel order of the convention.
  """
  spec = get_convention(convention)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3], got {tuple(images.shape)}")
  if tuple(image_hw.shape) != (images.shape[0], 2):
    raise ValueError(f"image_hw must be [B, 2] = {(images.shape[0], 2)}, got {tuple(image_hw.shape)}")
  x = jnp.asarray(images).astype(jnp.float32)
  if spec.channel_order == "bgr":
    x = x[..., ::-1]
  if spec.pixel_divisor != 1.0:
    x = x / jnp.float32(spec.pixel_divisor)
  x = (x - jnp.asarray(spec.mean, jnp.float32)) / jnp.asarray(spec.std, jnp.float32)
  image_hw = jnp.asarray(image_hw)
  rows = jnp.arange(images.shape[1])[None, :, None] < image_hw[:, 0, None, None]
  cols = jnp.arange(images.shape[2])[None, None, :] < image_hw[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], x, 0.0).astype(dtype)


def torchvision_resized_size(height: int, width: int, *, min_size: int = 800,
                             max_size: int = 1333) -> tuple[int, int]:
  """The `(h, w)` that torchvision's `GeneralizedRCNNTransform` resizes an image to at inference."""
  factor = min(min_size / min(height, width), max_size / max(height, width))
  return math.floor(height * factor), math.floor(width * factor)


def _linear_taps(in_size: int, out_size: int):
  """Source indices and weights of PyTorch's 1-D linear interpolation (`align_corners=False`)."""
  scale = np.float32(in_size) / np.float32(out_size)
  # `scale * (i + 0.5) - 0.5` rounded once to float32, as PyTorch's compiled kernel (a fused
  # multiply-add) computes it: float64 holds the float32 product exactly.
  real = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
  real = np.maximum(real, np.float32(0))
  index0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
  lambda1 = np.clip(real - index0.astype(np.float32), 0, 1).astype(np.float32)
  index1 = index0 + (index0 < in_size - 1)
  return index0, index1, (np.float32(1) - lambda1).astype(np.float32), lambda1


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`F.interpolate(image, size, mode='bilinear', align_corners=False)` of an `[h, w, C]` image, in
  float32 (the horizontal pass first, as PyTorch's CPU kernel)."""
  image = np.asarray(image, np.float32)
  y0, y1, wy0, wy1 = _linear_taps(image.shape[0], size[0])
  x0, x1, wx0, wx1 = _linear_taps(image.shape[1], size[1])
  wx0, wx1 = wx0[None, :, None], wx1[None, :, None]
  top = image[y0][:, x0] * wx0 + image[y0][:, x1] * wx1
  bottom = image[y1][:, x0] * wx0 + image[y1][:, x1] * wx1
  return (top * wy0[:, None, None] + bottom * wy1[:, None, None]).astype(np.float32)


def batch_images(images, *, size_divisible: int = 32, dtype=np.float32):
  """Stacks `[h, w, 3]` images into `[B, H, W, 3]`, zero-padded at the bottom/right to the largest
  size rounded up to a multiple of `size_divisible`. Returns `(batch, image_hw int32 [B, 2])`."""
  sizes = np.array([image.shape[:2] for image in images], np.int32)
  height, width = (-(-sizes.max(axis=0) // size_divisible) * size_divisible).tolist()
  batch = np.zeros((len(images), height, width, 3), dtype)
  for i, image in enumerate(images):
    batch[i, :image.shape[0], :image.shape[1]] = image
  return batch, sizes
