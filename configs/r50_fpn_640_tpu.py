"""R-50-FPN at a fixed 640x640 with large-scale jitter (random scale 0.1-2.0, crop or pad), bfloat16
compute, global batch 256 on a TPU pod (e.g. v4-32 / v5e-64: 8 or 4 images per chip), the TF Model
Garden / MLPerf-style recipe: lr 0.01 per 16 images scaled to 0.16, 22.5k steps (~50 epochs),
drops at 15k and 20k."""

from retinanet_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.data.mode = "lsj"
  c.data.image_size = 640
  c.data.scale_range = (0.1, 2.0)
  c.model.dtype = "bfloat16"
  c.train.batch_size = 256
  c.train.steps = 22_500
  c.train.decay_steps = (15_000, 20_000)
  c.train.warmup_steps = 500
  c.train.checkpoint_every = 1000
  c.eval.batch_size = 64
  return config_lib.apply_variant(c, arg)
