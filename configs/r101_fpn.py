"""RetinaNet R-101-FPN, 1x schedule (detectron2's retinanet_R_101_FPN_3x uses 3x: set
--config.train.steps=270000 --config.train.decay_steps='(210000,250000)')."""

from retinanet_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.model.backbone = "resnet101"
  return config_lib.apply_variant(c, arg)
