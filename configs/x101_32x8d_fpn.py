"""RetinaNet X-101-32x8d-FPN (ResNeXt), 1x schedule. The stride sits in the 3x3 convolution, as in
torchvision's and detectron2's ResNeXt weights."""

from retinanet_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.model.backbone = "resnext101_32x8d"
  return config_lib.apply_variant(c, arg)
