"""RetinaNet's classification and box subnets, shared across pyramid levels.

Each subnet is `num_convs` x (3x3 convolution with `channels` outputs, optional GroupNorm(32), ReLU),
then a 3x3 predictor with `num_anchors * outputs_per_anchor` channels. Weights start from N(0, 0.01);
biases from 0, except the classification predictor's `-log((1 - pi) / pi)` with `pi = prior_prob`
(0.01), so that every anchor starts with foreground probability pi (the paper's section 4.1).
With `norm='group_norm'` (torchvision v2) the tower convolutions have no bias (the norm has one).

Output layout (docs/design.md): a predictor channel is `a * outputs_per_anchor + k` for anchor `a` of
the location, so a level's NHWC output `[B, h, w, num_anchors * n]` reshapes to `[B, h * w *
num_anchors, n]` in the library's anchor order; levels are concatenated P3 first.

Shapes: `B` images, `A` anchors of all levels, `K` classes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from retinanet_jax.models import convolution

HEAD_NORMS = ("none", "group_norm")

normal_init = nnx.initializers.normal(0.01)


def _promote_except_bias(arrays, *, dtype):
  """Casts a convolution's input and kernel to `dtype` but keeps its (float32) bias."""
  inputs, kernel, bias = arrays
  if dtype is None:
    return inputs, kernel, bias
  return inputs.astype(dtype), kernel.astype(dtype), bias


class Subnet(nnx.Module):
  """One subnet: `Subnet(...)(features: sequence of [B, h, w, C]) -> [B, A, outputs_per_anchor]`.

  Attributes: `convs` and `norms` (`nnx.List`s; `norms` is empty without a norm), `predictor`.
  """

  def __init__(self, in_channels: int, *, num_anchors: int, outputs_per_anchor: int,
               num_convs: int = 4, norm: str = "none", predictor_bias: float = 0.0,
               norm_epsilon: float = 1e-5, dtype=None, kernel_gradient: str = "auto",
               rngs: nnx.Rngs):
    if norm not in HEAD_NORMS:
      raise ValueError(f"head norm must be one of {HEAD_NORMS}, got {norm!r}")
    use_norm = norm == "group_norm"
    conv_fn = convolution.conv_function(kernel_gradient)
    self.convs = nnx.List([
        nnx.Conv(in_channels, in_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=not use_norm,
                 kernel_init=normal_init, bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                 conv_general_dilated=conv_fn, rngs=rngs) for _ in range(num_convs)])
    self.norms = nnx.List([
        nnx.GroupNorm(in_channels, num_groups=32, epsilon=norm_epsilon, use_fast_variance=False,
                      dtype=dtype, rngs=rngs) for _ in range(num_convs)] if use_norm else [])
    # The predictor accumulates in float32 and adds its bias in float32: bfloat16 logits would be
    # quantized to steps of 2**-5 near the prior's -4.6, making ties in the score ranking.
    self.predictor = nnx.Conv(in_channels, num_anchors * outputs_per_anchor, (3, 3),
                              padding=((1, 1), (1, 1)), kernel_init=normal_init,
                              bias_init=nnx.initializers.constant(predictor_bias), dtype=dtype,
                              promote_dtype=_promote_except_bias,
                              preferred_element_type=jnp.float32, conv_general_dilated=conv_fn,
                              rngs=rngs)
    self.outputs_per_anchor = outputs_per_anchor

  def __call__(self, features):
    outputs = []
    for x in features:
      for i, conv in enumerate(self.convs):
        x = conv(x)
        if self.norms:
          x = self.norms[i](x)
        x = jax.nn.relu(x)
      x = self.predictor(x)
      outputs.append(x.reshape(x.shape[0], -1, self.outputs_per_anchor))
    return jnp.concatenate(outputs, axis=1)


def classification_bias(prior_prob: float) -> float:
  """`-log((1 - pi) / pi)`: the logit of `pi`."""
  if not 0.0 < prior_prob < 1.0:
    raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
  return -math.log((1.0 - prior_prob) / prior_prob)


class RetinaNetHead(nnx.Module):
  """`head(features) -> (class logits [B, A, K], box deltas [B, A, 4])`.

  Attributes: `classification` and `box` (`Subnet`s).
  """

  def __init__(self, in_channels: int = 256, *, num_classes: int, num_anchors: int = 9,
               num_convs: int = 4, norm: str = "none", prior_prob: float = 0.01,
               norm_epsilon: float = 1e-5, dtype=None, kernel_gradient: str = "auto",
               rngs: nnx.Rngs):
    common = dict(num_anchors=num_anchors, num_convs=num_convs, norm=norm, norm_epsilon=norm_epsilon,
                  dtype=dtype, kernel_gradient=kernel_gradient, rngs=rngs)
    self.classification = Subnet(in_channels, outputs_per_anchor=num_classes,
                                 predictor_bias=classification_bias(prior_prob), **common)
    self.box = Subnet(in_channels, outputs_per_anchor=4, **common)

  def __call__(self, features):
    return self.classification(features), self.box(features)
