"""RetinaNet (Lin et al. 2017): ResNet backbone, FPN P3-P7, and shared classification/box subnets.

`RetinaNet(config)(images [B, H, W, 3]) -> (cls_logits [B, A, K], box_deltas [B, A, 4])`, float32,
in the anchor order of docs/design.md (level P3..P7, row, column, anchor-within-location
aspect-ratio-major); `images` are normalized (`models/preprocessing.py`) and zero-padded. `A` is
`anchors.generate_anchors((H, W)).num_anchors` for `num_anchors = num_scales * len(aspect_ratios)`
anchors per location.

The model is described by one frozen dataclass, `RetinaNetConfig`; `build_model(model_config, *, rngs)`
takes that dataclass or any mapping with its field names (an `ml_collections.ConfigDict`, e.g. the
training config's `config.model`); an unknown field is an error. `dtype='bfloat16'` runs convolutions
and activations in bfloat16 while parameters and the two outputs stay float32.

`detect(model, images, image_hw, scale, ...)` is the jitted inference path: normalization, network,
decoding, class-wise NMS, and the division by `scale` that maps boxes back to the original image's
pixels.

Shapes: `B` images, `H, W` padded input size, `A` anchors of one image, `K` classes, `D` detections.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import postprocess
from retinanet_jax.models import fpn as fpn_lib
from retinanet_jax.models import heads as heads_lib
from retinanet_jax.models import preprocessing
from retinanet_jax.models import resnet

DTYPES = ("float32", "bfloat16")
# Fields that older checkpoints stored in the model config and that are no longer architecture.
LEGACY_FIELDS = ("conv_kernel_gradient",)


@dataclasses.dataclass(frozen=True)
class RetinaNetConfig:
  """Architecture of a RetinaNet. Defaults: torchvision's `retinanet_resnet50_fpn_v2` layout without
  its head GroupNorm, i.e. the paper's and detectron2's network, with 80 classes.

  Attributes:
    backbone: a key of `resnet.ARCHITECTURES`.
    norm: backbone normalization, one of `resnet.NORMS` ('frozen_bn', 'sync_bn', 'group_norm').
    freeze_at: 0..5 leading backbone blocks (stem, res2..res5) kept frozen (`resnet.FrozenParam`).
    stride_in_1x1: stride in the bottleneck's first 1x1 convolution (MSRA/caffe weights, detectron2's
      R-50/R-101) instead of its 3x3 (torchvision, and detectron2's X-101).
    norm_epsilon: epsilon of the backbone's norms (torchvision's COCO v1 weights run with 0.0).
    norm_axis_name: mesh axis for 'sync_bn' statistics (None under plain jit, see `resnet`).
    fpn_channels: channels of P3-P7 and of the head.
    p6_input: 'c5' (paper, detectron2, torchvision v2) or 'p5' (torchvision v1, TF reference).
    head_norm: 'none' (paper, detectron2, torchvision v1) or 'group_norm' (torchvision v2).
    head_num_convs: convolutions in each subnet's tower (4 in the paper).
    num_classes: `K`, foreground classes (no background class).
    num_anchors: anchors per location (`AnchorConfig.num_per_location`).
    prior_prob: initial foreground probability `pi` of the classification bias.
    dtype: computation dtype, 'float32' or 'bfloat16'.

  Fields with a fixed set of values carry it as `metadata["choices"]` (checked here and by
  `retinanet_jax.config`). How training computes convolution kernel gradients is not architecture:
  it is `RetinaNet`'s `kernel_gradient` argument, a runtime choice never stored in checkpoints.
  """

  backbone: str = dataclasses.field(default="resnet50",
                                    metadata={"choices": tuple(resnet.ARCHITECTURES)})
  norm: str = dataclasses.field(default="frozen_bn", metadata={"choices": resnet.NORMS})
  freeze_at: int = 2
  stride_in_1x1: bool = False
  norm_epsilon: float = 1e-5
  norm_axis_name: str | None = "data"
  fpn_channels: int = 256
  p6_input: str = dataclasses.field(default="c5", metadata={"choices": fpn_lib.P6_INPUTS})
  head_norm: str = dataclasses.field(default="none", metadata={"choices": heads_lib.HEAD_NORMS})
  head_num_convs: int = 4
  num_classes: int = 80
  # Derived from the anchors (`AnchorConfig.num_per_location`); not a command-line field.
  num_anchors: int = dataclasses.field(default=9, metadata={"derived": True})
  prior_prob: float = 0.01
  dtype: str = dataclasses.field(default="float32", metadata={"choices": DTYPES})

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.num_classes < 1 or self.num_anchors < 1:
      raise ValueError(f"num_classes and num_anchors must be >= 1, got {self.num_classes}, "
                       f"{self.num_anchors}")
    _ = self.backbone_config  # validates the backbone fields

  @property
  def backbone_config(self) -> resnet.ResNetConfig:
    return resnet.ResNetConfig(architecture=self.backbone, norm=self.norm, freeze_at=self.freeze_at,
                               stride_in_1x1=self.stride_in_1x1, norm_epsilon=self.norm_epsilon,
                               norm_axis_name=self.norm_axis_name)

  @classmethod
  def from_mapping(cls, mapping) -> RetinaNetConfig:
    """From a dict or `ml_collections.ConfigDict` holding (a subset of) the field names.

    `conv_kernel_gradient`, which checkpoints of the first release stored here, is not
    architecture any more and is dropped."""
    if isinstance(mapping, cls):
      return mapping
    if hasattr(mapping, "to_dict"):
      mapping = mapping.to_dict()
    if not isinstance(mapping, Mapping):
      raise TypeError(f"model config must be a RetinaNetConfig or a mapping, got {type(mapping)}")
    mapping = {k: v for k, v in mapping.items() if k not in LEGACY_FIELDS}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - names)
    if unknown:
      raise ValueError(f"unknown model config fields {unknown}; expected a subset of {sorted(names)}")
    return cls(**dict(mapping))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


class RetinaNet(nnx.Module):
  """`RetinaNet(config, rngs=...)(images) -> (cls_logits [B, A, K], box_deltas [B, A, 4])`.

  Attributes: `backbone` (`resnet.ResNet`), `fpn` (`fpn.FPN`), `head` (`heads.RetinaNetHead`),
  `config`.
  """

  def __init__(self, config: RetinaNetConfig = RetinaNetConfig(), *, kernel_gradient: str = "auto",
               rngs: nnx.Rngs):
    """`kernel_gradient`: how training computes convolution kernel gradients, one of
    `convolution.KERNEL_GRADIENTS` ('auto': 'nhwc' on the CPU, 'xla' elsewhere, the fastest
    measured; models/convolution.py). The same gradients either way; not part of the architecture."""
    dtype = jnp.dtype(config.dtype)
    self.backbone = resnet.ResNet(config.backbone_config, dtype=dtype,
                                  kernel_gradient=kernel_gradient, rngs=rngs)
    self.fpn = fpn_lib.FPN(self.backbone.out_channels, config.fpn_channels,
                           p6_input=config.p6_input, dtype=dtype,
                           kernel_gradient=kernel_gradient, rngs=rngs)
    self.head = heads_lib.RetinaNetHead(
        config.fpn_channels, num_classes=config.num_classes, num_anchors=config.num_anchors,
        num_convs=config.head_num_convs, norm=config.head_norm, prior_prob=config.prior_prob,
        dtype=dtype, kernel_gradient=kernel_gradient, rngs=rngs)
    self.config = config

  def features(self, images):
    """The pyramid `(P3, P4, P5, P6, P7)`, each `[B, ceil(H / 2**l), ceil(W / 2**l), fpn_channels]`."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got {tuple(images.shape)}")
    return self.fpn(*self.backbone(images))

  def __call__(self, images):
    cls_logits, box_deltas = self.head(self.features(images))
    return cls_logits.astype(jnp.float32), box_deltas.astype(jnp.float32)


def build_model(model_config, *, rngs: nnx.Rngs, kernel_gradient: str = "auto") -> RetinaNet:
  """A `RetinaNet` from a `RetinaNetConfig`, dict or `ConfigDict` with `RetinaNetConfig`'s fields."""
  return RetinaNet(RetinaNetConfig.from_mapping(model_config), kernel_gradient=kernel_gradient,
                   rngs=rngs)


def count_parameters(module: nnx.Module) -> int:
  """Number of weights, trained or frozen (`nnx.Param` and `resnet.FrozenParam`), without batch-norm
  statistics: torchvision's `sum(p.numel() for p in model.parameters())` for a model with BatchNorm2d."""
  state = nnx.state(module, nnx.Any(nnx.Param, resnet.FrozenParam))
  return sum(x.size for x in jax.tree.leaves(state))


@functools.partial(nnx.jit, static_argnames=("anchor_config", "convention", "score_threshold",
                                             "topk_candidates", "nms_threshold", "max_detections"))
def detect(model: RetinaNet, images, image_hw, scale, *,
           anchor_config: anchor_lib.AnchorConfig = anchor_lib.AnchorConfig(),
           convention: str = "torchvision", score_threshold: float = 0.05,
           topk_candidates: int = 1000, nms_threshold: float = 0.5,
           max_detections: int = 100) -> postprocess.Detections:
  """Detections in original-image pixels from a batch of padded images (jitted; call `model.eval()`
  first when it has `sync_bn` layers).

  Args:
    model: a `RetinaNet`.
    images: `[B, H, W, 3]`, uint8 RGB (or float RGB on the 0-255 scale), zero-padded.
    image_hw: int `[B, 2]` valid (resized, unpadded) size of each image.
    scale: float `[B, 2]`, (y, x) resized / original size (design.md's batch field `scale`).
    anchor_config: the anchors the model was trained with (anchors are built for `(H, W)` at trace time).
    convention: input normalization, a key of `preprocessing.CONVENTIONS`.
    score_threshold, topk_candidates, nms_threshold, max_detections: see
      `postprocess.postprocess_detections`.

  Returns:
    `Detections` `[B, D, ...]` whose boxes are `[x1, y1, x2, y2]` in original-image pixels.
  """
  anchors = anchor_lib.generate_anchors(images.shape[1:3], config=anchor_config)
  inputs = preprocessing.normalize_images(images, image_hw, convention=convention)
  cls_logits, box_deltas = model(inputs)
  detections = postprocess.postprocess_detections(
      cls_logits, box_deltas, anchors=anchors, image_hw=image_hw, score_threshold=score_threshold,
      topk_candidates=topk_candidates, nms_threshold=nms_threshold, max_detections=max_detections)
  scale_xyxy = jnp.asarray(scale, jnp.float32)[:, None, ::-1]  # (y, x) -> (x, y)
  boxes = detections.boxes / jnp.tile(scale_xyxy, (1, 1, 2))
  return dataclasses.replace(detections, boxes=jnp.where(detections.valid[..., None], boxes, 0.0))
