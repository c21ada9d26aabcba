"""Import of torchvision and detectron2 checkpoints, and the converted-checkpoint format.

Sources (`SOURCES`), each a file of named arrays:

| source                 | file                                    | what                              | input convention |
|------------------------|-----------------------------------------|-----------------------------------|------------------|
| `torchvision_v1`       | `retinanet_resnet50_fpn_coco-*.pth`     | RetinaNet, P6 from P5, 91 classes | `torchvision`    |
| `torchvision_v2`       | `retinanet_resnet50_fpn_v2_coco-*.pth`  | RetinaNet, GroupNorm head, 91 cls | `torchvision`    |
| `torchvision_backbone` | `resnet50-*.pth`, `resnext101_32x8d-*`  | ImageNet ResNet/ResNeXt           | `torchvision`    |
| `detectron2`           | model-zoo `model_final_*.pkl`           | RetinaNet R50/R101/X101, 80 cls   | `caffe` (R), `caffe_fair` (X) |
| `msra_backbone`        | `R-50.pkl`, `R-101.pkl`, `X-101-32x8d.pkl` | caffe2-named ImageNet backbones | `caffe` (R), `caffe_fair` (X) |

`.pth` files are read with torch (imported only then); `.pkl` files are plain pickles of NumPy arrays
(detectron2: `{'model': {name: array}}`; caffe2/Detectron: `{'blobs': {name: array}}` or the bare dict).

Conversion maps every variable of our model (`nnx.state(RetinaNet(...))`) to one source key, with
convolution kernels transposed from PyTorch's `[O, I, kh, kw]` to `[kh, kw, I, O]`. A source key we do
not use (other than known ignorable ones: `num_batches_tracked`, `fc.*`, ...), a variable with no source
key, or a shape mismatch is a `ValueError` that lists all of them.

Classes: torchvision's COCO heads have 91 outputs indexed by COCO category id (0 is background, ten ids
are unused 'N/A'); they are kept as they are by default (`class_mapping='keep'`, category id = class
index). `class_mapping='coco80'` slices the classification predictor to the 80 real COCO categories in
id order (detectron2's and the data pipeline's contiguous order). Anchors: detectron2's predictors are
ordered size-major within a location; they are permuted at import to our aspect-ratio-major order
(docs/design.md), for both the classification and the box predictor.

Converted model (a directory, `checkpoints.save_model`): `model/` (`nnx.to_pure_dict(nnx.state(model))`
saved with Orbax; for backbone sources only the `'backbone'` subtree) and `description.json` (a
`model_description.ModelDescription`: architecture, anchors, input convention, label map with names,
source). `checkpoints.load_model(path)` reads it back, like a training run; `load_into(module, state)`
copies a pure dict into a module with the same checks.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re

import numpy as np
from flax import nnx, traverse_util

from retinanet_jax import anchors as anchor_lib
from retinanet_jax.checkpoints import storage
from retinanet_jax.checkpoints.model_description import ModelDescription
from retinanet_jax.data.labels import LabelMap
from retinanet_jax.models import preprocessing
from retinanet_jax.models import retinanet as retinanet_lib

SOURCES = ("torchvision_v1", "torchvision_v2", "torchvision_backbone", "detectron2", "msra_backbone")
BACKBONE_SOURCES = ("torchvision_backbone", "msra_backbone")
CLASS_MAPPINGS = ("keep", "coco80")

# torchvision's COCO category names indexed by category id (torchvision.models._meta._COCO_CATEGORIES).
COCO_91_NAMES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack",
    "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush")
# The 80 COCO category ids in id order: contiguous class k <-> COCO_80_IDS[k].
COCO_80_IDS = tuple(i for i, name in enumerate(COCO_91_NAMES) if name not in ("__background__", "N/A"))
COCO_80_NAMES = tuple(COCO_91_NAMES[i] for i in COCO_80_IDS)

# Batch-norm epsilon of the published files whose epsilon differs from the architecture's 1e-5, by the
# first 8 hex digits of their SHA-256 (torchvision names its files `<name>-<sha256[:8]>.pth` and
# torch.hub checks that prefix). torchvision runs its COCO v1 weights with FrozenBatchNorm eps = 0
# (`overwrite_eps(model, 0.0)`); nothing in a v1 file's contents says so, hence the hash.
KNOWN_NORM_EPSILON = {"torchvision_v1": {"eeacb38b": 0.0}}  # retinanet_resnet50_fpn_coco-eeacb38b.pth

_NORM_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_CONV_NAMES = {"kernel": "weight", "bias": "bias"}
_IGNORED = {
    "torchvision_v1": (r"\.num_batches_tracked$",),
    "torchvision_v2": (r"\.num_batches_tracked$",),
    "torchvision_backbone": (r"\.num_batches_tracked$", r"^fc\."),
    "detectron2": (r"^pixel_(mean|std)$", r"^anchor_generator\.", r"\.num_batches_tracked$"),
    "msra_backbone": (r"^fc1000_", r"^pred_", r"_momentum$"),
}


# ----------------------------------------------------------------------------------------------
# Model configurations of the sources.


def source_defaults(source: str, *, backbone: str = "resnet50") -> dict:
  """Model-config fields, input convention and anchor convention that reproduce `source`."""
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  if source.startswith("torchvision"):
    model = dict(backbone=backbone, stride_in_1x1=False, norm_epsilon=1e-5, num_classes=91)
    if source == "torchvision_v1":
      # torchvision runs its COCO v1 weights with FrozenBatchNorm eps = 0 (`overwrite_eps`).
      model.update(p6_input="p5", head_norm="none", norm_epsilon=0.0)
    elif source == "torchvision_v2":
      model.update(p6_input="c5", head_norm="group_norm")
    return dict(model=model, input_convention="torchvision", anchor_convention="torchvision")
  resnext = backbone.startswith("resnext")  # FAIR's X-101-32x8d: torchvision layout, caffe input
  model = dict(backbone=backbone, stride_in_1x1=not resnext, norm_epsilon=1e-5, p6_input="c5",
               head_norm="none", num_classes=80)
  return dict(model=model, input_convention="caffe_fair" if resnext else "caffe",
              anchor_convention="detectron2")


# ----------------------------------------------------------------------------------------------
# Key mapping: our variable path -> source key.


def _conv_norm_leaf(path, conv_name, norm_name):
  """('conv', 'kernel') -> conv_name + 'weight'; ('norm', 'scale') -> norm_name + 'weight'."""
  kind, leaf = path
  if kind == "conv":
    return conv_name + _CONV_NAMES[leaf]
  return norm_name + _NORM_NAMES[leaf]


def torchvision_key(path: tuple) -> str:
  """torchvision's `retinanet_resnet50_fpn[_v2]` state-dict key of one of our variable paths."""
  part, rest = path[0], path[1:]
  if part == "backbone":
    return "backbone.body." + torchvision_backbone_key(rest)
  if part == "fpn":
    if rest[0] in ("p6", "p7"):
      return f"backbone.fpn.extra_blocks.{rest[0]}.{_CONV_NAMES[rest[1]]}"
    blocks = {"laterals": "inner_blocks", "outputs": "layer_blocks"}[rest[0]]
    return f"backbone.fpn.{blocks}.{rest[1]}.0.{_CONV_NAMES[rest[2]]}"
  if part == "head":
    prefix = {"classification": "head.classification_head.", "box": "head.regression_head."}[rest[0]]
    if rest[1] == "predictor":
      return prefix + {"classification": "cls_logits.", "box": "bbox_reg."}[rest[0]] + _CONV_NAMES[rest[2]]
    if rest[1] == "convs":
      return f"{prefix}conv.{rest[2]}.0.{_CONV_NAMES[rest[3]]}"
    return f"{prefix}conv.{rest[2]}.1.{_NORM_NAMES[rest[3]]}"
  raise KeyError(path)


def torchvision_backbone_key(path: tuple) -> str:
  """torchvision `ResNet` state-dict key of a path inside our `ResNet`."""
  if path[0] == "stem":
    return _conv_norm_leaf(path[1:], "conv1.", "bn1.")
  stage, block, member = int(path[0][3:]), path[1], path[2]
  prefix = f"layer{stage - 1}.{block}."
  if member == "shortcut":
    return _conv_norm_leaf(path[3:], prefix + "downsample.0.", prefix + "downsample.1.")
  j = member[4:]
  return _conv_norm_leaf(path[3:], f"{prefix}conv{j}.", f"{prefix}bn{j}.")


def detectron2_key(path: tuple) -> str:
  """detectron2 RetinaNet state-dict key of one of our variable paths."""
  part, rest = path[0], path[1:]
  if part == "backbone":
    if rest[0] == "stem":
      name = "backbone.bottom_up.stem.conv1."
    else:
      member = "shortcut" if rest[2] == "shortcut" else rest[2]
      name = f"backbone.bottom_up.{rest[0]}.{rest[1]}.{member}."
      rest = rest[2:]
    return _conv_norm_leaf(rest[1:], name, name + "norm.")
  if part == "fpn":
    if rest[0] in ("p6", "p7"):
      return f"backbone.top_block.{rest[0]}.{_CONV_NAMES[rest[1]]}"
    kind = {"laterals": "lateral", "outputs": "output"}[rest[0]]
    return f"backbone.fpn_{kind}{rest[1] + 3}.{_CONV_NAMES[rest[2]]}"
  if part == "head":
    if rest[1] == "predictor":
      name = {"classification": "head.cls_score.", "box": "head.bbox_pred."}[rest[0]]
      return name + _CONV_NAMES[rest[2]]
    if rest[1] == "convs":
      tower = {"classification": "cls_subnet", "box": "bbox_subnet"}[rest[0]]
      return f"head.{tower}.{2 * rest[2]}.{_CONV_NAMES[rest[3]]}"
    raise ValueError("detectron2's RetinaNet head has no norm in the model zoo; use head_norm='none'")
  raise KeyError(path)


def msra_key(path: tuple) -> str:
  """caffe2 / Detectron ImageNet key (e.g. 'res2_0_branch2a_bn_s') of a path inside our `ResNet`."""
  if path[0] == "stem":
    name, (kind, leaf) = "conv1", path[1:]
    norm = "res_conv1_bn"
  else:
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
    name = f"{path[0]}_{path[1]}_{branch[path[2]]}"
    norm, (kind, leaf) = name + "_bn", path[3:]
  if kind == "conv":
    return name + "_w"
  return norm + {"scale": "_s", "bias": "_b", "mean": "_rm", "var": "_riv"}[leaf]


# ----------------------------------------------------------------------------------------------
# Reading source files.


def read_source_file(path: str) -> dict[str, np.ndarray]:
  """`{name: np.ndarray}` from a torch `.pth`/`.pt` or a pickled `.pkl` checkpoint."""
  if path.endswith(".pkl"):
    with open(path, "rb") as f:
      data = pickle.load(f, encoding="latin1")
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
      data = data["model"]
    elif isinstance(data, dict) and isinstance(data.get("blobs"), dict):
      data = data["blobs"]
  else:
    import torch  # pylint: disable=import-outside-toplevel  # only needed to convert .pth files

    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
      data = data["model"]  # torchvision reference-script checkpoints
    data = {k: v.detach().cpu().numpy() for k, v in data.items() if hasattr(v, "detach")}
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a dict of arrays, got {type(data)}")
  return {k: np.asarray(v) for k, v in data.items()}


def upgrade_torchvision_keys(state_dict: dict) -> dict:
  """Renames keys of old torchvision checkpoints (FPN blocks and head towers before torchvision
  0.13, e.g. the COCO v1 file) to the current names, as torchvision's `_load_from_state_dict` does."""
  out = {}
  for key, value in state_dict.items():
    key = re.sub(r"^(backbone\.fpn\.(inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\3", key)
    match = re.match(r"^(head\.(classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$", key)
    if match:
      key = f"{match[1]}.{int(match[3]) // 2}.0.{match[4]}"
    out[key] = value
  return out


# ----------------------------------------------------------------------------------------------
# Conversion.


def anchor_permutation(num_scales: int, num_ratios: int) -> np.ndarray:
  """`perm[a]` = detectron2 (size-major) index of our (ratio-major) anchor `a = r * S + s`."""
  return np.array([s * num_ratios + r for r in range(num_ratios) for s in range(num_scales)])


def permute_anchors(value: np.ndarray, perm: np.ndarray) -> np.ndarray:
  """Re-orders the anchors of a predictor's output channels (last axis, channel `a * n + k`):
  output anchor `a` takes input anchor `perm[a]`."""
  out = value.reshape(value.shape[:-1] + (len(perm), -1))[..., perm, :]
  return out.reshape(value.shape)


def select_classes(value: np.ndarray, classes, num_anchors: int) -> np.ndarray:
  """Keeps classes `classes` (in that order) of a classification predictor's output channels."""
  out = value.reshape(value.shape[:-1] + (num_anchors, -1))[..., np.asarray(classes)]
  return out.reshape(value.shape[:-1] + (-1,))


def target_shapes(model_config, *, backbone_only: bool = False) -> dict[tuple, tuple]:
  """`{path: shape}` of every variable of the model `model_config` describes."""
  abstract = nnx.eval_shape(lambda: retinanet_lib.build_model(model_config, rngs=nnx.Rngs(0)))
  shapes = {tuple(path): tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(abstract))}
  if backbone_only:
    shapes = {path: shape for path, shape in shapes.items() if path[0] == "backbone"}
  return shapes


def convert_state_dict(state_dict: dict, *, source: str, model_config,
                       class_mapping: str = "keep", num_scales: int = 3,
                       num_ratios: int = 3) -> dict:
  """Our pure-dict state (nested, int keys for list indices) from a source state dict.

  Args:
    state_dict: `{name: array}` as `read_source_file` returns.
    source: one of `SOURCES`.
    model_config: the `RetinaNetConfig` (or mapping) to fill; for torchvision sources with
      `class_mapping='coco80'` its `num_classes` must be 80.
    class_mapping: 'keep' or 'coco80' (torchvision detection sources only).
    num_scales, num_ratios: the anchors per location, for detectron2's predictor permutation.

  Returns:
    `{'backbone': ..., 'fpn': ..., 'head': ...}` of float32 NumPy arrays (only `'backbone'` for
    backbone sources).

  Raises:
    ValueError: listing unused source keys, model variables without a source key, and shape
      mismatches.
  """
  config = retinanet_lib.RetinaNetConfig.from_mapping(model_config)
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  if class_mapping not in CLASS_MAPPINGS:
    raise ValueError(f"class_mapping must be one of {CLASS_MAPPINGS}, got {class_mapping!r}")
  if class_mapping == "coco80" and source not in ("torchvision_v1", "torchvision_v2"):
    raise ValueError(f"class_mapping='coco80' applies to torchvision detection sources, not {source}")
  backbone_only = source in BACKBONE_SOURCES
  if source.startswith("torchvision") and not backbone_only:
    state_dict = upgrade_torchvision_keys(state_dict)
  key_fn = {"torchvision_v1": torchvision_key, "torchvision_v2": torchvision_key,
            "torchvision_backbone": lambda p: torchvision_backbone_key(p[1:]),
            "detectron2": detectron2_key, "msra_backbone": lambda p: msra_key(p[1:])}[source]
  num_anchors = num_scales * num_ratios
  if not backbone_only and config.num_anchors != num_anchors:
    raise ValueError(f"model_config.num_anchors={config.num_anchors} but num_scales * num_ratios = "
                     f"{num_anchors}")

  flat, used, missing, mismatched = {}, set(), [], []
  for path, shape in target_shapes(config, backbone_only=backbone_only).items():
    key = key_fn(path)
    if key not in state_dict:
      value = _synthesized(source, path, key, shape, state_dict, config)
      if value is None:
        missing.append(key)
        continue
    else:
      value = np.asarray(state_dict[key], np.float32)
      used.add(key)
    if path[-1] == "kernel" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
    slice_classes = class_mapping == "coco80" and path[-3:-1] == ("classification", "predictor")
    source_shape = shape[:-1] + (num_anchors * len(COCO_91_NAMES),) if slice_classes else shape
    if value.shape != source_shape:
      mismatched.append(f"{key}: model {source_shape}, checkpoint {value.shape}")
      continue
    if source == "detectron2" and path[-2] == "predictor":
      value = permute_anchors(value, anchor_permutation(num_scales, num_ratios))
    elif slice_classes:
      value = select_classes(value, COCO_80_IDS, num_anchors)
    flat[path] = value

  ignored = [re.compile(p) for p in _IGNORED[source]]
  unused = sorted(k for k in state_dict if k not in used and not any(p.search(k) for p in ignored))
  if missing or unused or mismatched:
    raise ValueError(
        f"cannot convert the {source} checkpoint to {config}:\n  missing keys: {sorted(missing)}\n"
        f"  unexpected keys: {unused}\n  shape mismatches: {mismatched}")
  if source == "detectron2":
    _check_pixel_stats(state_dict, source_defaults(source, backbone=config.backbone)["input_convention"])
  return traverse_util.unflatten_dict(flat)


def _synthesized(source, path, key, shape, state_dict, config):
  """Statistics absent from caffe2 checkpoints, whose batch norms are already folded into an affine
  `_bn_s`, `_bn_b`: mean 0 and var 1 - eps, so that `scale / sqrt(var + eps) == scale`."""
  if source == "msra_backbone" and path[-1] in ("mean", "var") and (
      key.rsplit("_", 1)[0] + "_s" in state_dict):
    if path[-1] == "mean":
      return np.zeros(shape, np.float32)
    return np.full(shape, 1.0 - config.norm_epsilon, np.float32)
  return None


def _check_pixel_stats(state_dict, convention: str):
  """detectron2 checkpoints may carry their input normalization: it must be `convention`'s."""
  spec = preprocessing.get_convention(convention)
  for name, expected in (("pixel_mean", spec.mean), ("pixel_std", spec.std)):
    if name in state_dict:
      found = np.asarray(state_dict[name], np.float64).reshape(-1)
      if found.shape != (3,) or not np.allclose(found, expected, atol=1e-2):
        raise ValueError(f"detectron2 checkpoint has {name} {found.tolist()}, but the "
                         f"{convention!r} input convention this backbone implies uses {list(expected)}")


# ----------------------------------------------------------------------------------------------
# The converted-checkpoint directory.


def label_map_for(source: str, class_mapping: str, num_classes: int) -> LabelMap:
  """The COCO classes of a converted COCO model (category ids and names)."""
  if source in ("torchvision_v1", "torchvision_v2") and class_mapping == "keep":
    ids, names = list(range(len(COCO_91_NAMES))), list(COCO_91_NAMES)
  else:
    ids, names = list(COCO_80_IDS), list(COCO_80_NAMES)
  if len(ids) != num_classes:
    ids, names = list(range(num_classes)), [str(i) for i in range(num_classes)]
  return LabelMap(tuple(ids), tuple(names))


def describe_source(*, source: str, source_file: str, model_config, input_convention: str,
                    anchor_config: anchor_lib.AnchorConfig,
                    class_mapping: str = "keep") -> ModelDescription:
  """The `ModelDescription` of a model converted from `source_file`."""
  config = retinanet_lib.RetinaNetConfig.from_mapping(model_config)
  backbone = source in BACKBONE_SOURCES
  return ModelDescription(
      kind="backbone" if backbone else "retinanet", model=config, anchors=anchor_config,
      input_convention=input_convention,
      label_map=None if backbone else label_map_for(source, class_mapping, config.num_classes),
      source={"format": source, "file": os.path.basename(source_file),
              "class_mapping": class_mapping})


def sha256_prefix(path: str) -> str:
  """The first 8 hex digits of the file's SHA-256 (torch.hub's file-name hash)."""

  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()[:8]


def known_norm_epsilon(source_file: str, *, source: str) -> float:
  """The batch-norm epsilon of a published `source` file, recognized by its hash
  (`KNOWN_NORM_EPSILON`); a `ValueError` asking for `norm_epsilon` for any other file."""
  known = KNOWN_NORM_EPSILON[source]
  prefix = sha256_prefix(source_file)
  if prefix not in known:
    raise ValueError(
        f"{source_file}: not one of the published {source} files (its SHA-256 starts {prefix}; known: "
        f"{sorted(known)}), so its batch-norm epsilon is unknown and no default would be right for "
        f"every file: give norm_epsilon (scripts/convert_weights.py --norm_epsilon): 0.0 if it was "
        f"trained or fine-tuned as torchvision's COCO v1 model runs (FrozenBatchNorm2d eps 0), 1e-5 "
        f"for torchvision's default FrozenBatchNorm2d/BatchNorm2d (a model built and trained with "
        f"retinanet_resnet50_fpn(weights=None) or the reference scripts)")
  return known[prefix]


def convert(source_file: str, output_dir: str, *, source: str, backbone: str = "resnet50",
            class_mapping: str = "keep", anchor_config: anchor_lib.AnchorConfig | None = None,
            **config_overrides) -> ModelDescription:
  """Converts `source_file` to a model directory `output_dir` (`checkpoints.save_model`: `model/`
  and `description.json`, read back by `checkpoints.load_model`); returns its description.

  `config_overrides` replace fields of the source's model config (`source_defaults`), e.g.
  `norm_epsilon=1e-5` or `freeze_at=0`. For `torchvision_v1` without `norm_epsilon` the file must be
  torchvision's published COCO file (recognized by its SHA-256, epsilon 0.0); any other v1 file is a
  `ValueError` asking for `norm_epsilon` (`known_norm_epsilon`), instead of a silently wrong default.
  """
  defaults = source_defaults(source, backbone=backbone)
  if source in KNOWN_NORM_EPSILON and "norm_epsilon" not in config_overrides:
    config_overrides = {**config_overrides,
                        "norm_epsilon": known_norm_epsilon(source_file, source=source)}
  model_fields = {**defaults["model"], **config_overrides}
  if class_mapping == "coco80":
    model_fields["num_classes"] = len(COCO_80_IDS)
  config = retinanet_lib.RetinaNetConfig.from_mapping(model_fields)
  anchor_config = anchor_config or anchor_lib.AnchorConfig(convention=defaults["anchor_convention"])
  state = convert_state_dict(read_source_file(source_file), source=source, model_config=config,
                             class_mapping=class_mapping, num_scales=anchor_config.num_scales,
                             num_ratios=len(anchor_config.aspect_ratios))
  description = describe_source(source=source, source_file=source_file, model_config=config,
                                input_convention=defaults["input_convention"],
                                anchor_config=anchor_config, class_mapping=class_mapping)
  storage.save_model(output_dir, state, description)
  return description
