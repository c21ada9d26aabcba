"""The RetinaNet network in Flax NNX: ResNet/ResNeXt backbone, FPN, heads, input normalization."""

from retinanet_jax.models.preprocessing import CONVENTIONS, normalize_images
from retinanet_jax.models.resnet import ARCHITECTURES, NORMS, FrozenParam, ResNet, ResNetConfig
from retinanet_jax.models.retinanet import (RetinaNet, RetinaNetConfig, build_model,
                                            count_parameters, detect)

__all__ = ["ARCHITECTURES", "CONVENTIONS", "FrozenParam", "NORMS", "ResNet", "ResNetConfig",
           "RetinaNet", "RetinaNetConfig", "build_model", "count_parameters", "detect",
           "normalize_images"]
