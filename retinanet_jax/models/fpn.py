"""Feature pyramid network (Lin et al. 2017) for RetinaNet: C3, C4, C5 -> P3, P4, P5, P6, P7.

  * P5 = out5(lat5(C5)); P4 = out4(lat4(C4) + up(lat5(C5))); P3 = out3(lat3(C3) + up(...)), where the
    laterals `lat_l` are 1x1 convolutions, the outputs `out_l` are 3x3 convolutions (both with bias and
    no normalization) and `up` is nearest-neighbour upsampling to the lateral's exact shape (torchvision's
    `F.interpolate(size=...)`), so that inputs of any size (not only multiples of 32) work.
  * P6 = 3x3/2 convolution of C5 (`p6_input='c5'`: the paper, detectron2, torchvision v2) or of P5
    (`p6_input='p5'`: torchvision v1, the TF reference); P7 = 3x3/2 convolution of ReLU(P6).

All maps are NHWC with `out_channels` channels; level `l` has `ceil(H / 2**l)` rows for an `H`-row image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retinanet_jax.models import convolution

P6_INPUTS = ("c5", "p5")

# torchvision's FPN and LastLevelP6P7, detectron2's c2_xavier_fill: kaiming_uniform_(a=1), bias 0.
fpn_kernel_init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output row for nearest resizing, as PyTorch's `nearest` mode computes it:
  `min(floor(i * (in / out)), in - 1)` in float32 (exactly `i // 2` when `out == 2 * in`)."""
  if out_size == 2 * in_size:
    return np.arange(out_size) // 2
  scale = np.float32(in_size) / np.float32(out_size)
  return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def upsample_nearest(x, size: tuple[int, int]):
  """Nearest upsampling of NHWC `x` to spatial `size`, matching `F.interpolate(x, size, 'nearest')`."""
  for axis, out_size in ((1, size[0]), (2, size[1])):
    in_size = x.shape[axis]
    index = nearest_indices(in_size, out_size)
    if np.array_equal(index, np.arange(out_size) // 2):  # the usual case: repeat (and crop if odd)
      x = jax.lax.slice_in_dim(jnp.repeat(x, 2, axis=axis), 0, out_size, axis=axis)
    else:
      x = jnp.take(x, index, axis=axis)
  return x


def _conv(in_channels, out_channels, kernel_size, *, stride=1, dtype, kernel_gradient, rngs):
  pad = kernel_size // 2
  return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
                  padding=((pad, pad), (pad, pad)), kernel_init=fpn_kernel_init,
                  bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                  conv_general_dilated=convolution.conv_function(kernel_gradient), rngs=rngs)


class FPN(nnx.Module):
  """`FPN(...)(c3, c4, c5) -> (p3, p4, p5, p6, p7)`.

  Attributes: `laterals` and `outputs` (`nnx.List`s of three convolutions, index 0 = level 3), `p6`,
  `p7`.
  """

  def __init__(self, in_channels: tuple[int, int, int], out_channels: int = 256, *,
               p6_input: str = "c5", dtype=None, kernel_gradient: str = "auto", rngs: nnx.Rngs):
    if p6_input not in P6_INPUTS:
      raise ValueError(f"p6_input must be one of {P6_INPUTS}, got {p6_input!r}")
    if len(in_channels) != 3:
      raise ValueError(f"in_channels must give the channels of (C3, C4, C5), got {in_channels}")
    conv = functools.partial(_conv, dtype=dtype, kernel_gradient=kernel_gradient, rngs=rngs)
    self.laterals = nnx.List([conv(c, out_channels, 1) for c in in_channels])
    self.outputs = nnx.List([conv(out_channels, out_channels, 3) for _ in in_channels])
    p6_channels = in_channels[-1] if p6_input == "c5" else out_channels
    self.p6 = conv(p6_channels, out_channels, 3, stride=2)
    self.p7 = conv(out_channels, out_channels, 3, stride=2)
    self.p6_input = p6_input

  def __call__(self, c3, c4, c5):
    inner = self.laterals[2](c5)
    results = [self.outputs[2](inner)]
    for level_index, c in ((1, c4), (0, c3)):
      lateral = self.laterals[level_index](c)
      inner = lateral + upsample_nearest(inner, lateral.shape[1:3])
      results.insert(0, self.outputs[level_index](inner))
    p6 = self.p6(c5 if self.p6_input == "c5" else results[-1])
    p7 = self.p7(jax.nn.relu(p6))
    return (*results, p6, p7)
