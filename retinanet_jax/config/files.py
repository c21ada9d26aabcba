"""Config files and the configs of saved runs.

    c = default_config()                          # the paper's setting, a ConfigDict
    c = load_config_file("configs/r50_fpn.py:smoke")
    config = load_run_config("runs/r50")          # a training run's own config.json, typed
"""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections

from retinanet_jax.config.sections import Config

VARIANTS = ("", "smoke")
# Written into a training run's workdir: the config without its runtime section (evaluate.py reads
# the data and evaluation settings from it).
RUN_CONFIG_FILE = "config.json"


def default_config() -> ml_collections.ConfigDict:
  """The paper's setting (R-50-FPN, COCO 2017, detectron2's 1x schedule) as a `ConfigDict`: the
  base of `configs/*.py`."""
  return Config().to_config_dict()


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Structural variants of a config file (`--config=configs/x.py:smoke`): '' or 'smoke' (a couple
  of tiny steps at 128 px: checks that everything runs)."""
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; expected one of {VARIANTS}")
  if arg == "smoke":
    c.data.train_min_size_range = (128, 128)
    c.data.eval_min_size = 128
    c.data.max_size = 128
    c.data.eval_split = "validation[:8]"
    c.train.batch_size = 4
    c.train.steps = 2
    c.train.warmup_steps = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.eval.batch_size = 4
    c.eval.num_images_png = 2
  return c


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(variant)` of a config file, `PATH[:VARIANT]` as on the command line (for
  notebooks, and for config files built on another one)."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      "retinanet_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"no config file {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def load_run_config(path: str) -> Config:
  """The typed config of the training run that `path` (its workdir, or a folder up to three levels
  below it, e.g. a step's checkpoint) belongs to, from its `config.json`."""
  folder = os.path.abspath(path)
  for _ in range(4):
    candidate = os.path.join(folder, RUN_CONFIG_FILE)
    if os.path.isfile(candidate):
      with open(candidate) as f:
        return Config.from_json(json.load(f))
    folder = os.path.dirname(folder)
  raise FileNotFoundError(f"{path} is not inside a training run (no {RUN_CONFIG_FILE} in or above "
                          f"it)")

