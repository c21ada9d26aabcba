"""What a checkpoint says about its model: enough to rebuild it and run it, with no training config.

Every checkpoint carries one `ModelDescription`, training runs (each step's `description` item) and
converted weights (`description.json`) alike (`checkpoints/storage.py`):

  kind              'retinanet' or 'backbone' (ImageNet weights: `model` then describes the backbone
                    fields only; anchors and label map are not meaningful).
  model             `RetinaNetConfig`: the architecture.
  anchors           `AnchorConfig`: the anchors the heads were trained for.
  input_convention  the normalization of the network's input (models/preprocessing.py).
  label_map         contiguous class -> dataset category id and name (`data.LabelMap`).
  geometry          the evaluation resize of the training data (`Geometry`: 'resize' keeping the
                    aspect ratio, or 'fixed', stretched to a square), the default of
                    scripts/detect.py and what scripts/export.py's side files tell a deployer; None
                    for converted weights ('resize' with torchvision's 800/1333/32 then).
  source            where the weights came from: `{'format': 'training', 'step': N}` or
                    `{'format': 'torchvision_v1', 'file': ..., 'class_mapping': ...}`.

Runtime choices (kernel-gradient mode, donation, XLA flags) are not part of it: they belong to the
process that runs the model, not to the model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from flax import nnx

from retinanet_jax import anchors as anchor_lib
from retinanet_jax.runtime import typed_config
from retinanet_jax.data import labels as labels_lib
from retinanet_jax.models import preprocessing
from retinanet_jax.models import retinanet as retinanet_lib

# 3: `geometry.mode` and `geometry.image_size` (descriptions of version 2 have neither: 'resize').
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
KINDS = ("retinanet", "backbone")
GEOMETRY_MODES = ("resize", "fixed")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How an image is resized for the model (the evaluation resize of its training data).

  mode 'resize' (default; data.mode 'resize' and 'lsj'): aspect ratio kept, short side `min_size`,
    long side at most `max_size` (torchvision's inference resize); boxes map back to the image's
    pixels by dividing by the resize factor. `image_size` is None.
  mode 'fixed' (data.mode 'fixed', SARDet-100K's keep_ratio=False): every image stretched to
    `image_size x image_size` whatever its aspect ratio; boxes map back per axis: x / sx, y / sy with
    `sx = image_size / width`, `sy = image_size / height`. `min_size` and `max_size` are not used
    (training writes them equal to `image_size`).
  Either way the resized image is zero-padded at the bottom/right to a multiple of `pad_multiple`.
  Descriptions written before the mode was recorded (format_version 1 and 2) read as 'resize'.
  """

  min_size: int = 800
  max_size: int = 1333
  pad_multiple: int = 32
  mode: str = "resize"
  image_size: Optional[int] = None

  def __post_init__(self):
    if self.mode not in GEOMETRY_MODES:
      raise ValueError(f"geometry.mode must be one of {GEOMETRY_MODES}, got {self.mode!r}")
    if self.mode == "fixed":
      if (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
          or self.image_size < 1):
        raise ValueError(f"geometry.image_size must be a positive integer in mode 'fixed' (the "
                         f"side of the stretched square), got {self.image_size!r}")
    elif self.image_size is not None:
      raise ValueError(f"geometry.image_size is the side of mode 'fixed'; mode {self.mode!r} takes "
                       f"none, got {self.image_size!r}")

  def resized_hw(self, height: int, width: int) -> tuple[int, int]:
    """The `(h, w)` an image of `height x width` pixels is resized to (before padding)."""
    if self.mode == "fixed":
      return self.image_size, self.image_size
    return preprocessing.torchvision_resized_size(height, width, min_size=self.min_size,
                                                  max_size=self.max_size)


@dataclasses.dataclass(frozen=True)
class ModelDescription:
  """Module docstring."""

  kind: str
  model: retinanet_lib.RetinaNetConfig
  anchors: anchor_lib.AnchorConfig
  input_convention: str
  label_map: Optional[labels_lib.LabelMap]
  geometry: Optional[Geometry] = None
  source: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    preprocessing.get_convention(self.input_convention)
    if self.kind == "retinanet":
      if self.label_map is None:
        raise ValueError("a RetinaNet's description needs its label map")
      if self.label_map.num_classes != self.model.num_classes:
        raise ValueError(f"the label map has {self.label_map.num_classes} classes but the model "
                         f"{self.model.num_classes}")
      if self.anchors.num_per_location != self.model.num_anchors:
        raise ValueError(f"the anchors give {self.anchors.num_per_location} per location but the "
                         f"model has {self.model.num_anchors}")

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict, as it reads back from a file (tuples become lists)."""
    return json.loads(json.dumps({
        "format_version": FORMAT_VERSION,
        "kind": self.kind,
        "model": self.model.to_dict(),
        "anchors": dataclasses.asdict(self.anchors),
        "input_convention": self.input_convention,
        "label_map": None if self.label_map is None else {
            "category_ids": list(self.label_map.category_ids), "names": list(self.label_map.names)},
        "geometry": None if self.geometry is None else dataclasses.asdict(self.geometry),
        "source": dict(self.source),
    }))

  @classmethod
  def from_json(cls, obj: dict, *, where: str = "description") -> ModelDescription:
    """From `to_json()`'s dict, or from the `metadata.json` of a converted checkpoint of the first
    release (format_version 1: its model config also held `conv_kernel_gradient`, dropped here).
    A geometry without `mode` (versions 1 and 2) reads as 'resize'."""
    version = obj.get("format_version")
    if version not in READABLE_VERSIONS:
      raise ValueError(f"{where}: format_version {version!r}; this release reads "
                       f"{', '.join(map(str, READABLE_VERSIONS))}")
    try:
      model = retinanet_lib.RetinaNetConfig.from_mapping(obj["model"])  # drops LEGACY_FIELDS
      anchors = typed_config.from_mapping(anchor_lib.AnchorConfig, obj["anchors"], prefix="anchors.")
      label_map = obj.get("label_map")
      if label_map is not None and label_map.get("category_ids") is not None:
        label_map = labels_lib.LabelMap(tuple(int(c) for c in label_map["category_ids"]),
                                        tuple(str(n) for n in label_map["names"]))
      else:
        label_map = None
      geometry = obj.get("geometry")
      return cls(kind=obj["kind"], model=model, anchors=anchors,
                 input_convention=obj["input_convention"], label_map=label_map,
                 geometry=None if geometry is None else Geometry(**geometry),
                 source=dict(obj.get("source") or {}))
    except KeyError as e:
      raise ValueError(f"{where}: missing field {e}") from None
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: {e}") from None

  def build_abstract_model(self, *, dtype: Optional[str] = None, kernel_gradient: str = "auto"):
    """The model as `nnx.eval_shape` builds it (no random initialization): load weights into it."""
    config = self.model if dtype is None else dataclasses.replace(self.model, dtype=dtype)
    return nnx.eval_shape(lambda: retinanet_lib.build_model(
        config, rngs=nnx.Rngs(0), kernel_gradient=kernel_gradient))
