"""model_description.Geometry: the resize mode ('resize' / 'fixed') a description records, its JSON
round trip, descriptions written before the mode existed (read as 'resize'), what training writes
for each data.mode, and the resized size against float64 arithmetic."""

import json
import math

import numpy as np
import pytest

from configs import r50_fpn_640_tpu, sardet_r50, synthetic
from retinanet_jax import anchors as anchor_lib
from retinanet_jax import config as config_lib
from retinanet_jax.training import train_state
from retinanet_jax.data.labels import LabelMap
from retinanet_jax.checkpoints.model_description import Geometry, ModelDescription
from retinanet_jax.models import retinanet

LABELS = LabelMap((1, 2, 7), ("ship", "aircraft", "car"))


def _description(geometry):
  return ModelDescription(kind="retinanet", model=retinanet.RetinaNetConfig(num_classes=3),
                          anchors=anchor_lib.AnchorConfig(), input_convention="torchvision",
                          label_map=LABELS, geometry=geometry, source={"format": "training"})


@pytest.mark.parametrize("geometry", [
    Geometry(min_size=800, max_size=800, pad_multiple=32, mode="fixed", image_size=800),
    Geometry(min_size=640, max_size=1000, pad_multiple=128), None])
def test_round_trip_keeps_the_mode(geometry):
  description = _description(geometry)
  obj = json.loads(json.dumps(description.to_json()))  # as it reads back from a file
  assert obj["format_version"] == 3
  if geometry is not None:
    assert (obj["geometry"]["mode"], obj["geometry"]["image_size"]) == (
        geometry.mode, geometry.image_size)
  assert ModelDescription.from_json(obj) == description


def test_a_description_written_before_the_mode_reads_as_resize():
  """format_version 2 (this project before the mode was recorded): a geometry of three fields."""
  obj = _description(None).to_json()
  obj["format_version"] = 2
  obj["geometry"] = {"min_size": 600, "max_size": 1000, "pad_multiple": 128}
  geometry = ModelDescription.from_json(obj).geometry
  assert geometry == Geometry(min_size=600, max_size=1000, pad_multiple=128, mode="resize",
                              image_size=None)
  assert geometry.resized_hw(300, 500) == (600, 1000)


def test_bad_geometry_is_named():
  obj = _description(Geometry()).to_json()
  obj["geometry"]["mode"] = "stretch"
  with pytest.raises(ValueError, match=r"^run/description: geometry\.mode must be one of "
                                       r"\('resize', 'fixed'\), got 'stretch'"):
    ModelDescription.from_json(obj, where="run/description")
  with pytest.raises(ValueError, match="geometry.image_size must be a positive integer in mode "
                                       "'fixed'.*got None"):
    Geometry(mode="fixed")
  with pytest.raises(ValueError, match="mode 'resize' takes none, got 800"):
    Geometry(image_size=800)
  obj["format_version"] = 4
  with pytest.raises(ValueError, match="format_version 4; this release reads 1, 2, 3"):
    ModelDescription.from_json(obj)


def test_training_writes_the_mode_of_its_data():
  """describe(): data.mode 'fixed' -> 'fixed' with its side; 'resize' and 'lsj' -> 'resize'."""
  cases = {sardet_r50: Geometry(800, 800, 32, mode="fixed", image_size=800),
           r50_fpn_640_tpu: Geometry(640, 640, 128),  # LSJ's evaluation: fit into 640 x 640
           synthetic: None}
  for module, expected in cases.items():
    c = module.get_config()
    c.model.num_classes = 3
    config = config_lib.Config.from_config_dict(c)
    geometry = train_state.describe(config, LABELS).geometry
    if expected is None:  # the synthetic default: 'resize' with its own sizes
      expected = Geometry(c.data.eval_min_size, c.data.max_size, c.data.pad_multiple)
      assert c.data.mode == "resize"
    assert geometry == expected, module.__name__


def test_resized_hw_against_float64():
  rng = np.random.default_rng(0)
  fixed = Geometry(mode="fixed", image_size=800)
  keep = Geometry(min_size=800, max_size=1333)
  for height, width in rng.integers(20, 3000, (50, 2)).tolist():
    assert fixed.resized_hw(height, width) == (800, 800)
    factor = min(800 / min(height, width), 1333 / max(height, width))  # float64
    assert keep.resized_hw(height, width) == (math.floor(height * factor),
                                              math.floor(width * factor))
  assert keep.resized_hw(480, 640) == (800, 1066)  # by hand: 640 * 5 / 3 = 1066.7
  assert keep.resized_hw(100, 1000) == (133, 1333)  # the long side limits
