"""Every config file builds into a valid typed config; the typed config rejects every bad value
before anything is compiled, naming the field, the value and the allowed values, all in one pass."""

import dataclasses
import importlib
import json
import os
import typing

import pytest

from retinanet_jax import config as config_lib
from retinanet_jax.training import optimizer, train_state
from retinanet_jax.data import transforms

CONFIGS = ["r50_fpn", "r101_fpn", "x101_32x8d_fpn", "r50_fpn_v2", "r50_fpn_640_tpu", "synthetic",
           "sardet_r50", "sku110k", "carpk", "dense_synthetic"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_config_is_valid(name, variant):
  config = config_lib.Config.from_config_dict(
      importlib.import_module(f"configs.{name}").get_config(variant))
  assert config.model.num_anchors == config.anchors.num_per_location == 9
  geometry = transforms.TransformConfig.from_data_config(config.data)
  h, w = transforms.padded_hw(geometry)
  assert h % 32 == 0 and w % 32 == 0
  optimizer.make_optimizer(config.train)
  schedule = optimizer.learning_rate_schedule(config.train)
  lr = config.train.base_lr * config.train.batch_size / 16
  assert float(schedule(config.train.warmup_steps)) == pytest.approx(lr, rel=1e-3)


def test_paper_settings_in_the_base_config():
  c = config_lib.Config.from_config_dict(importlib.import_module("configs.r50_fpn").get_config())
  assert (c.loss.alpha, c.loss.gamma) == (0.25, 2.0)
  assert (c.matching.positive_threshold, c.matching.negative_threshold) == (0.5, 0.4)
  assert (c.train.batch_size, c.train.base_lr, c.train.steps) == (16, 0.01, 90_000)
  assert tuple(c.train.decay_steps) == (60_000, 80_000)
  assert (c.data.train_min_size_range, c.data.max_size) == ((800, 800), 1333)
  assert (c.eval.score_threshold, c.eval.topk_candidates, c.eval.nms_threshold,
          c.eval.max_detections) == (0.05, 1000, 0.5, 100)


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="variant"):
    importlib.import_module("configs.r50_fpn").get_config("huge")


def _choice_fields(cls, prefix=""):
  """`(path, allowed values)` of every field with choices, in `cls` and its nested sections."""
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[field.name]):
      yield from _choice_fields(hints[field.name], f"{prefix}{field.name}.")
    elif field.metadata.get("choices") is not None:
      yield f"{prefix}{field.name}", tuple(field.metadata["choices"])


CHOICE_FIELDS = list(_choice_fields(config_lib.Config))


def test_the_enum_fields_are_all_found():
  names = {path for path, _ in CHOICE_FIELDS}
  assert {"loss.normalizer", "loss.box_loss", "anchors.convention", "matching.low_quality",
          "train.optimizer", "train.schedule", "data.mode", "model.backbone", "model.norm",
          "model.p6_input", "model.head_norm", "model.dtype", "runtime.conv_kernel_gradient",
          "runtime.donate_state", "runtime.grad_reduction", "init_mode",
          "input_convention"} <= names


@pytest.mark.parametrize("path, allowed", CHOICE_FIELDS, ids=[p for p, _ in CHOICE_FIELDS])
def test_every_enum_field_rejects_a_wrong_value_by_name(path, allowed):
  c = config_lib.default_config()
  *sections, leaf = path.split(".")
  node = c
  for s in sections:
    node = node[s]
  node[leaf] = "Bogus"
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.Config.from_config_dict(c)
  assert error.value.problems == [f"{path}: 'Bogus' is not one of {allowed}"]


def test_every_problem_is_reported_in_one_pass():
  c = config_lib.default_config()
  c.loss.normalizer, c.loss.box_loss, c.anchors.convention = "EMA", "giou2", "tv"
  c.train.optimiser = "sgd"  # a misspelt field
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.Config.from_config_dict(c)
  message = str(error.value)
  for expected in ("loss.normalizer: 'EMA' is not one of ('batch', 'ema')",
                   "loss.box_loss: 'giou2' is not one of ('l1', 'smooth_l1', 'huber', 'giou')",
                   "anchors.convention: 'tv' is not one of ('torchvision', 'detectron2', 'tf')",
                   "train.optimiser: unknown field"):
    assert expected in message
  assert len(error.value.problems) == 4


def test_inconsistent_values_and_derived_fields_are_rejected_with_the_section():
  c = config_lib.default_config()
  c.matching.negative_threshold = 0.7
  with pytest.raises(config_lib.ConfigError, match=r"matching: need 0 <= negative_threshold"):
    config_lib.Config.from_config_dict(c)
  c = config_lib.default_config()
  c.model.num_anchors = 9
  with pytest.raises(config_lib.ConfigError, match="model.num_anchors: derived"):
    config_lib.Config.from_config_dict(c)


def test_runtime_choices_are_not_architecture_and_never_persisted():
  c = config_lib.Config.from_config_dict(config_lib.default_config())
  assert "runtime" not in c.to_json()
  assert "conv_kernel_gradient" not in c.to_json()["model"]
  assert "conv_kernel_gradient" not in json.dumps(train_state.describe(
      c, _coco_labels()).to_json())
  assert config_lib.Config.from_json(json.loads(json.dumps(c.to_json()))) == c


def _coco_labels():
  from retinanet_jax.data import labels  # pylint: disable=import-outside-toplevel
  return labels.COCO_LABEL_MAP


def test_config_files_load_by_path_with_a_variant():
  c = config_lib.load_config_file(os.path.join(REPO, "configs", "synthetic.py") + ":smoke")
  assert c.train.steps == 3 and c.model.backbone == "resnet18"


def test_eval_max_dets_are_checked_against_max_detections():
  c = config_lib.default_config()
  assert config_lib.Config.from_config_dict(c).eval.max_dets == (1, 10, 100)
  c.eval.max_dets = [1, 10, 100, 300]  # a list, as JSON gives it back
  c.eval.max_detections = 300
  typed = config_lib.Config.from_config_dict(c)
  assert typed.eval.max_dets == (1, 10, 100, 300)
  assert config_lib.Config.from_json(json.loads(json.dumps(typed.to_json()))) == typed
  c.eval.max_detections = 200
  with pytest.raises(config_lib.ConfigError, match=r"eval: max_dets \(1, 10, 100, 300\) ends above "
                     r"max_detections=200.*raise max_detections to >= 300"):
    config_lib.Config.from_config_dict(c)
  c.eval.max_dets = (10, 1)
  with pytest.raises(config_lib.ConfigError, match="eval: max_dets must be strictly increasing"):
    config_lib.Config.from_config_dict(c)


def test_a_missing_optional_evaluation_backend_is_named_at_the_boundary(monkeypatch):
  import importlib.util as util
  c = config_lib.default_config()
  c.eval.backend = "faster_coco_eval"
  assert config_lib.Config.from_config_dict(c).eval.backend == "faster_coco_eval"  # installed here
  real = util.find_spec
  monkeypatch.setattr(util, "find_spec",
                      lambda name, *a: None if name == "faster_coco_eval" else real(name, *a))
  with pytest.raises(config_lib.ConfigError, match=r"eval: backend 'faster_coco_eval' needs .* "
                     r"pip install 'faster-coco-eval==1.8.0'"):
    config_lib.Config.from_config_dict(c)


def test_sardet_recipe():
  c = config_lib.Config.from_config_dict(importlib.import_module("configs.sardet_r50").get_config())
  assert (c.data.mode, c.data.image_size, c.model.num_classes) == ("fixed", 800, 6)
  assert transforms.padded_hw(transforms.TransformConfig.from_data_config(c.data)) == (800, 800)
  assert (c.train.optimizer, c.train.base_lr, c.train.weight_decay) == ("adamw", 1e-4, 0.05)
  # 1x: 12 epochs of 94,493 images at batch 16, drops after epochs 8 and 11, 500 warm-up steps.
  assert (c.train.steps, c.train.decay_steps, c.train.warmup_steps) == (70_870, (47_247, 64_964),
                                                                        500)


# ----------------------------------------------------------------------------------------------
# Derived fields follow their sources after overrides (config.derive_fields)


def test_synthetic_image_size_alone_gives_consistent_sizes():
  from configs import synthetic  # pylint: disable=import-outside-toplevel
  from retinanet_jax.data import config as data_config  # pylint: disable=import-outside-toplevel

  # The formula the boundary uses is the one synthetic_data_config() applied at the native size.
  native = data_config.synthetic_data_config()
  assert {k: (tuple(native[k]) if k == "train_min_size_range" else native[k])
          for k in config_lib.synthetic_sizes(0)} == config_lib.synthetic_sizes(
              native.synthetic.image_size)
  c = synthetic.get_config()
  c.data.synthetic.image_size = 64  # as --config.data.synthetic.image_size=64 does
  d = config_lib.Config.from_config_dict(c).data
  assert d.synthetic.image_size == 64
  assert (d.train_min_size_range, d.eval_min_size, d.max_size, d.image_size, d.pad_multiple) == (
      (64, 64), 64, 64, 64, 32)
  assert transforms.padded_hw(transforms.TransformConfig.from_data_config(d)) == (64, 64)
  assert c.data.eval_min_size == 128  # the ConfigDict itself is left as it was
  # Sizes the user chose (another input size than the native one) are kept.
  c.data.eval_min_size = c.data.max_size = 96
  d = config_lib.Config.from_config_dict(c).data
  assert (d.eval_min_size, d.max_size, d.train_min_size_range) == (96, 96, (128, 128))
  # Non-synthetic data: nothing is derived.
  coco = importlib.import_module("configs.r50_fpn").get_config()
  assert config_lib.Config.from_config_dict(coco).data.eval_min_size == 800


def test_smoke_composes_with_fewer_validation_images_and_a_slice_too_long_is_named():
  from configs import synthetic  # pylint: disable=import-outside-toplevel

  c = synthetic.get_config("smoke")
  c.data.synthetic.num_validation = 8  # the smoke variant evaluates its whole validation split
  assert config_lib.Config.from_config_dict(c).data.eval_split == "validation"
  c.data.eval_split = "validation[:16]"
  c.data.train_split = "train[:100]"
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.Config.from_config_dict(c)
  assert error.value.problems == [
      "data.train_split: 'train[:100]' reaches image 100 but the synthetic 'train' split has "
      "data.synthetic.num_train=64 images; use train[:64] or less, or 'train'",
      "data.eval_split: 'validation[:16]' reaches image 16 but the synthetic 'validation' split "
      "has data.synthetic.num_validation=8 images; use validation[:8] or less, or 'validation'"]


def test_dense_scene_fields_are_checked_at_the_boundary():
  c = config_lib.default_config()
  typed = config_lib.Config.from_config_dict(c)
  assert typed.eval.count_score_threshold is None and typed.eval.nms_mode == "tiled"
  c.eval.count_score_threshold = 0.4
  assert config_lib.Config.from_config_dict(c).eval.count_score_threshold == 0.4
  c.eval.count_score_threshold = 1.5
  c.runtime.matching_block_size = -1
  with pytest.raises(config_lib.ConfigError) as raised:
    config_lib.Config.from_config_dict(c)
  assert "count_score_threshold must be in [0, 1]" in str(raised.value)
  assert "runtime: matching_block_size must be >= 0" in str(raised.value)  # both in one pass
  c.eval.count_score_threshold = None
  c.runtime.matching_block_size = 0
  c.eval.nms_mode = "fast"
  with pytest.raises(config_lib.ConfigError, match=r"nms_mode.*'fast'.*'tiled'"):
    config_lib.Config.from_config_dict(c)
