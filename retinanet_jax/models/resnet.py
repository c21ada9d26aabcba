"""ResNet and ResNeXt backbones in Flax NNX, NHWC, returning the C3, C4, C5 feature maps.

Layout follows torchvision (`torchvision.models.resnet`): a 7x7/2 stem convolution, normalization,
ReLU and a 3x3/2 max-pool, then four stages `res2..res5` (torchvision's `layer1..layer4`) with output
strides 4, 8, 16, 32. A bottleneck block puts its stride in the 3x3 convolution (torchvision, "ResNet
v1.5"); `stride_in_1x1=True` puts it in the first 1x1 convolution instead, as the MSRA/caffe ImageNet
models that detectron2 uses. Every convolution has no bias and is followed by a normalization.

Shapes: `B` images, `H, W` input size; stage `s` has `ceil(H / 2**s)` rows for any input size.

Normalization (`norm`, one of `NORMS`):
  * `frozen_bn`: an affine transform from stored batch-norm statistics (torchvision's and detectron2's
    `FrozenBatchNorm2d`): `y = (x - mean) * scale / sqrt(var + epsilon) + bias`. Never updated.
  * `sync_bn`: `nnx.BatchNorm` with `axis_name=norm_axis_name`, so that a step run under `shard_map`
    (or `pmap`) over mesh axis `'data'` averages the statistics across devices. Under plain `jax.jit`
    with a batch sharded over the mesh, set `norm_axis_name=None`: XLA then computes global statistics
    by itself.
  * `group_norm`: `nnx.GroupNorm` with 32 groups.

Freezing (`freeze_at`, detectron2's semantics): 0 freezes nothing, 1 the stem, 2 the stem and res2
(default, as detectron2 and torchvision's `trainable_backbone_layers=3`), ... 5 everything. A frozen
stage holds its weights in `FrozenParam` variables instead of `nnx.Param`, and its batch norms are
`FrozenBatchNorm` whatever `norm` says (as detectron2's `freeze()`). Variable types in this library:
  * `nnx.Param`: trained. `nnx.Optimizer(model, tx, wrt=nnx.Param)` and `nnx.grad` see only these.
  * `FrozenParam`: stored, restored and counted as parameters, never trained (frozen stages and the
    scale and bias of every `FrozenBatchNorm`).
  * `nnx.BatchStat`: batch-norm running statistics (updated only by `sync_bn` in training mode).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from retinanet_jax.models import convolution

NORMS = ("frozen_bn", "sync_bn", "group_norm")

# name -> (block kind, blocks per stage res2..res5, groups, width per group)
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), 64, 4),
}
STAGES = ("res2", "res3", "res4", "res5")
GROUP_NORM_GROUPS = 32

# torchvision's ResNet initialization: kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class FrozenParam(nnx.Variable):
  """A parameter that is stored, restored and counted, but never trained.

  Not a subclass of `nnx.Param`, so that every `nnx.Param` filter (optimizers, `nnx.grad`) skips it.
  """


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Which backbone to build.

  Attributes:
    architecture: a key of `ARCHITECTURES` ('resnet50', 'resnext101_32x8d', ...).
    norm: one of `NORMS` (module docstring).
    freeze_at: 0..5, number of leading blocks (stem, res2, ..., res5) whose weights are frozen.
    stride_in_1x1: False (torchvision) or True (MSRA/caffe models, detectron2's R-50/R-101).
    norm_epsilon: the batch-norm / group-norm epsilon. 1e-5 everywhere except torchvision's COCO
      RetinaNet v1 weights, which torchvision runs with 0.0 (`overwrite_eps`).
    norm_axis_name: mesh axis over which `sync_bn` averages statistics (None: no collective).

  How training computes kernel gradients is not architecture: it is the `kernel_gradient` argument
  of `ResNet` (a runtime choice, never stored with the weights).
  """

  architecture: str = "resnet50"
  norm: str = "frozen_bn"
  freeze_at: int = 2
  stride_in_1x1: bool = False
  norm_epsilon: float = 1e-5
  norm_axis_name: str | None = "data"

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {self.architecture!r}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if not 0 <= self.freeze_at <= 5:
      raise ValueError(f"freeze_at must be in 0..5, got {self.freeze_at}")


class FrozenBatchNorm(nnx.Module):
  """Batch norm with fixed statistics: `y = x * scale' + bias'`, `scale' = scale / sqrt(var + eps)`,
  `bias' = bias - mean * scale'`, computed in float32 (as torchvision's `FrozenBatchNorm2d`), then
  applied in the input's dtype. Attribute names match `nnx.BatchNorm`, so the two load each other's
  checkpoints."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-5):
    self.scale = FrozenParam(jnp.ones((num_features,), jnp.float32))
    self.bias = FrozenParam(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.epsilon = epsilon

  def __call__(self, x):
    scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.epsilon)
    bias = self.bias[...] - self.mean[...] * scale
    return x * scale.astype(x.dtype) + bias.astype(x.dtype)


def make_norm(kind: str, num_features: int, *, epsilon: float, axis_name: str | None, dtype,
              rngs: nnx.Rngs):
  """A normalization layer over the channel (last) axis; `kind` is one of `NORMS`."""
  if kind == "frozen_bn":
    return FrozenBatchNorm(num_features, epsilon=epsilon)
  if kind == "sync_bn":
    # torch momentum 0.1 == flax momentum 0.9. Starts in evaluation mode; model.train() switches.
    return nnx.BatchNorm(num_features, use_running_average=True, momentum=0.9, epsilon=epsilon,
                         axis_name=axis_name, dtype=dtype, rngs=rngs)
  if kind == "group_norm":
    return nnx.GroupNorm(num_features, num_groups=GROUP_NORM_GROUPS, epsilon=epsilon,
                         use_fast_variance=False, dtype=dtype, rngs=rngs)
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def freeze(module: nnx.Module) -> None:
  """Turns every `nnx.Param` under `module` into a `FrozenParam` (in place)."""
  for _, sub in nnx.iter_modules(module):
    for name, value in list(vars(sub).items()):
      if type(value) is nnx.Param:  # pylint: disable=unidiomatic-typecheck
        setattr(sub, name, FrozenParam(value[...]))


class ConvNorm(nnx.Module):
  """A bias-free convolution with torch-style symmetric padding `kernel_size // 2`, then a norm."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               groups: int = 1, norm: str, epsilon: float, axis_name: str | None, dtype,
               kernel_gradient: str = "auto", rngs: nnx.Rngs):
    pad = kernel_size // 2
    self.conv = nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
                         padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
                         kernel_init=conv_kernel_init, dtype=dtype,
                         conv_general_dilated=convolution.conv_function(kernel_gradient), rngs=rngs)
    self.norm = make_norm(norm, out_channels, epsilon=epsilon, axis_name=axis_name, dtype=dtype,
                          rngs=rngs)

  def __call__(self, x):
    return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions (ResNet-18/34); `expansion = 1`."""

  expansion = 1

  def __init__(self, in_channels: int, planes: int, *, stride: int, groups: int, width_per_group: int,
               stride_in_1x1: bool, **norm_kwargs):
    del stride_in_1x1  # one 3x3 convolution carries the stride either way
    if groups != 1 or width_per_group != 64:
      raise ValueError(f"BasicBlock needs groups=1, width_per_group=64, got {groups}, {width_per_group}")
    self.conv1 = ConvNorm(in_channels, planes, 3, stride=stride, **norm_kwargs)
    self.conv2 = ConvNorm(planes, planes, 3, **norm_kwargs)
    self.shortcut = (ConvNorm(in_channels, planes, 1, stride=stride, **norm_kwargs)
                     if stride != 1 or in_channels != planes else None)

  def __call__(self, x):
    out = jax.nn.relu(self.conv1(x))
    out = self.conv2(out)
    identity = x if self.shortcut is None else self.shortcut(x)
    return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1 with a residual connection; `expansion = 4`."""

  expansion = 4

  def __init__(self, in_channels: int, planes: int, *, stride: int, groups: int, width_per_group: int,
               stride_in_1x1: bool, **norm_kwargs):
    width = int(planes * (width_per_group / 64.0)) * groups  # torchvision's formula
    out_channels = planes * self.expansion
    stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
    self.conv1 = ConvNorm(in_channels, width, 1, stride=stride_1x1, **norm_kwargs)
    self.conv2 = ConvNorm(width, width, 3, stride=stride_3x3, groups=groups, **norm_kwargs)
    self.conv3 = ConvNorm(width, out_channels, 1, **norm_kwargs)
    self.shortcut = (ConvNorm(in_channels, out_channels, 1, stride=stride, **norm_kwargs)
                     if stride != 1 or in_channels != out_channels else None)

  def __call__(self, x):
    out = jax.nn.relu(self.conv1(x))
    out = jax.nn.relu(self.conv2(out))
    out = self.conv3(out)
    identity = x if self.shortcut is None else self.shortcut(x)
    return jax.nn.relu(out + identity)


class ResNet(nnx.Module):
  """`ResNet(config)(images [B, H, W, 3]) -> (C3, C4, C5)`, strides 8, 16, 32.

  Attributes: `stem` (a `ConvNorm`), `res2..res5` (`nnx.List`s of blocks), `out_channels` (C3, C4, C5
  channel counts: (512, 1024, 2048) for bottleneck networks, (128, 256, 512) for ResNet-18/34).
  """

  def __init__(self, config: ResNetConfig = ResNetConfig(), *, dtype=None,
               kernel_gradient: str = "auto", rngs: nnx.Rngs):
    convolution.check_kernel_gradient(kernel_gradient)
    kind, depths, groups, width_per_group = ARCHITECTURES[config.architecture]
    block_cls = BasicBlock if kind == "basic" else Bottleneck

    def norm_kwargs(index):  # index 0 is the stem, 1..4 are res2..res5
      frozen = index < config.freeze_at
      norm = "frozen_bn" if frozen and config.norm == "sync_bn" else config.norm
      return dict(norm=norm, epsilon=config.norm_epsilon, axis_name=config.norm_axis_name,
                  dtype=dtype, kernel_gradient=kernel_gradient, rngs=rngs)

    self.stem = ConvNorm(3, 64, 7, stride=2, **norm_kwargs(0))
    if config.freeze_at >= 1:
      freeze(self.stem)
    in_channels = 64
    out_channels = []
    for index, (name, depth) in enumerate(zip(STAGES, depths), start=1):
      planes = 64 * 2 ** (index - 1)
      blocks = []
      for b in range(depth):
        stride = 2 if b == 0 and index > 1 else 1
        blocks.append(block_cls(in_channels, planes, stride=stride, groups=groups,
                                width_per_group=width_per_group, stride_in_1x1=config.stride_in_1x1,
                                **norm_kwargs(index)))
        in_channels = planes * block_cls.expansion
      stage = nnx.List(blocks)
      if index < config.freeze_at:
        freeze(stage)
      setattr(self, name, stage)
      out_channels.append(in_channels)
    self.out_channels = tuple(out_channels[1:])
    self.config = config

  def __call__(self, images):
    x = jax.nn.relu(self.stem(images))
    x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = []
    for name in STAGES:
      for block in getattr(self, name):
        x = block(x)
      features.append(x)
    return tuple(features[1:])
