"""Every config builds into a valid model config, anchor config, data geometry and optimizer."""

import importlib

import pytest

from retinanet_jax import train
from retinanet_jax.data import transforms
from retinanet_jax.models import retinanet

CONFIGS = ["r50_fpn", "r101_fpn", "x101_32x8d_fpn", "r50_fpn_v2", "r50_fpn_640_tpu", "synthetic"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_config_is_valid(name, variant):
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  retinanet.RetinaNetConfig.from_mapping(config.model)
  anchors = train.anchor_config(config)
  geometry = transforms.TransformConfig.from_data_config(config.data)
  h, w = transforms.padded_hw(geometry)
  assert h % 32 == 0 and w % 32 == 0
  train.make_optimizer(config.train)
  schedule = train.learning_rate_schedule(config.train)
  lr = config.train.base_lr * config.train.batch_size / 16
  assert float(schedule(config.train.warmup_steps)) == pytest.approx(lr, rel=1e-3)
  assert anchors.num_per_location == 9


def test_paper_settings_in_the_base_config():
  c = importlib.import_module("configs.r50_fpn").get_config()
  assert (c.loss.alpha, c.loss.gamma) == (0.25, 2.0)
  assert (c.loss.positive_threshold, c.loss.negative_threshold) == (0.5, 0.4)
  assert (c.train.batch_size, c.train.base_lr, c.train.steps) == (16, 0.01, 90_000)
  assert tuple(c.train.decay_steps) == (60_000, 80_000)
  assert (c.data.train_min_size_range, c.data.max_size) == ((800, 800), 1333)
  assert (c.eval.score_threshold, c.eval.topk_candidates, c.eval.nms_threshold,
          c.eval.max_detections) == (0.05, 1000, 0.5, 100)


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="variant"):
    importlib.import_module("configs.r50_fpn").get_config("huge")
