"""Checkpoint import: key mappings (golden), detectron2's anchor permutation, caffe2 names, errors, and
the converted-checkpoint directory (Orbax state + metadata) end to end against torchvision."""

import hashlib
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from torchvision.models import _meta
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNet as TorchRetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import checkpoints
from retinanet_jax.checkpoints import weights
from retinanet_jax.models import preprocessing, retinanet, resnet

forward = nnx.jit(lambda model, images: model(images))


def test_coco_names_match_torchvision():
  assert weights.COCO_91_NAMES == tuple(_meta._COCO_CATEGORIES)  # pylint: disable=protected-access
  assert len(weights.COCO_80_IDS) == 80 and weights.COCO_80_IDS[:12] == (1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                          10, 11, 13)
  assert weights.COCO_80_NAMES[-1] == "toothbrush" and weights.COCO_80_IDS[-1] == 90


@pytest.mark.parametrize("path, key", [
    (("backbone", "stem", "conv", "kernel"), "backbone.body.conv1.weight"),
    (("backbone", "stem", "norm", "var"), "backbone.body.bn1.running_var"),
    (("backbone", "res2", 0, "shortcut", "conv", "kernel"), "backbone.body.layer1.0.downsample.0.weight"),
    (("backbone", "res5", 2, "conv3", "norm", "scale"), "backbone.body.layer4.2.bn3.weight"),
    (("fpn", "laterals", 0, "kernel"), "backbone.fpn.inner_blocks.0.0.weight"),
    (("fpn", "outputs", 2, "bias"), "backbone.fpn.layer_blocks.2.0.bias"),
    (("fpn", "p6", "kernel"), "backbone.fpn.extra_blocks.p6.weight"),
    (("head", "classification", "convs", 3, "kernel"), "head.classification_head.conv.3.0.weight"),
    (("head", "box", "norms", 1, "scale"), "head.regression_head.conv.1.1.weight"),
    (("head", "classification", "predictor", "bias"), "head.classification_head.cls_logits.bias"),
    (("head", "box", "predictor", "kernel"), "head.regression_head.bbox_reg.weight"),
])
def test_torchvision_keys_golden(path, key):
  assert weights.torchvision_key(path) == key


@pytest.mark.parametrize("path, key", [
    (("backbone", "stem", "conv", "kernel"), "backbone.bottom_up.stem.conv1.weight"),
    (("backbone", "stem", "norm", "mean"), "backbone.bottom_up.stem.conv1.norm.running_mean"),
    (("backbone", "res3", 0, "shortcut", "norm", "bias"), "backbone.bottom_up.res3.0.shortcut.norm.bias"),
    (("backbone", "res4", 5, "conv2", "conv", "kernel"), "backbone.bottom_up.res4.5.conv2.weight"),
    (("fpn", "laterals", 0, "kernel"), "backbone.fpn_lateral3.weight"),
    (("fpn", "outputs", 2, "bias"), "backbone.fpn_output5.bias"),
    (("fpn", "p7", "kernel"), "backbone.top_block.p7.weight"),
    (("head", "classification", "convs", 3, "bias"), "head.cls_subnet.6.bias"),
    (("head", "box", "convs", 0, "kernel"), "head.bbox_subnet.0.weight"),
    (("head", "classification", "predictor", "kernel"), "head.cls_score.weight"),
    (("head", "box", "predictor", "bias"), "head.bbox_pred.bias"),
])
def test_detectron2_keys_golden(path, key):
  assert weights.detectron2_key(path) == key


@pytest.mark.parametrize("path, key", [
    (("stem", "conv", "kernel"), "conv1_w"), (("stem", "norm", "scale"), "res_conv1_bn_s"),
    (("res2", 0, "shortcut", "conv", "kernel"), "res2_0_branch1_w"),
    (("res4", 22, "conv2", "norm", "bias"), "res4_22_branch2b_bn_b"),
    (("res5", 2, "conv3", "conv", "kernel"), "res5_2_branch2c_w"),
])
def test_msra_keys_golden(path, key):
  assert weights.msra_key(path) == key


def test_old_torchvision_keys_are_upgraded():
  old = {"backbone.fpn.inner_blocks.1.weight": 1, "backbone.fpn.layer_blocks.0.bias": 2,
         "head.classification_head.conv.6.weight": 3, "head.regression_head.conv.2.bias": 4,
         "head.classification_head.conv.3.0.weight": 5, "backbone.body.conv1.weight": 6}
  assert weights.upgrade_torchvision_keys(old) == {
      "backbone.fpn.inner_blocks.1.0.weight": 1, "backbone.fpn.layer_blocks.0.0.bias": 2,
      "head.classification_head.conv.3.0.weight": 3, "head.regression_head.conv.1.0.bias": 4,
      "head.classification_head.conv.3.0.weight": 5, "backbone.body.conv1.weight": 6}


# ------------------------------------------------------------------------------------------------
# detectron2: a synthetic checkpoint written from detectron2's layout, independently of weights.py.


def detectron2_state_dict(*, depths, groups=1, width_per_group=64, num_classes=80, num_anchors=9,
                          rng=None):
  """Keys and [O, I, kh, kw] shapes of a detectron2 RetinaNet (ResNet-FPN, P6/P7 from res5). Values
  are random with `rng`, else zero-cost broadcast zeros."""
  shapes = {}

  def conv(name, out_c, in_c, k, bias=False, norm=True):
    shapes[name + ".weight"] = (out_c, in_c, k, k)
    if bias:
      shapes[name + ".bias"] = (out_c,)
    if norm:
      for leaf in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.norm.{leaf}"] = (out_c,)

  conv("backbone.bottom_up.stem.conv1", 64, 3, 7)
  in_c = 64
  for s, depth in enumerate(depths):
    planes = 64 * 2**s
    width = planes * width_per_group // 64 * groups
    for i in range(depth):
      prefix = f"backbone.bottom_up.res{s + 2}.{i}."
      if i == 0:
        conv(prefix + "shortcut", planes * 4, in_c, 1)
      conv(prefix + "conv1", width, in_c, 1)
      conv(prefix + "conv2", width, width // groups, 3)
      conv(prefix + "conv3", planes * 4, width, 1)
      in_c = planes * 4
  for level, c in zip((3, 4, 5), (512, 1024, 2048)):
    conv(f"backbone.fpn_lateral{level}", 256, c, 1, bias=True, norm=False)
    conv(f"backbone.fpn_output{level}", 256, 256, 3, bias=True, norm=False)
  conv("backbone.top_block.p6", 256, 2048, 3, bias=True, norm=False)
  conv("backbone.top_block.p7", 256, 256, 3, bias=True, norm=False)
  for tower in ("cls_subnet", "bbox_subnet"):
    for i in range(4):
      conv(f"head.{tower}.{2 * i}", 256, 256, 3, bias=True, norm=False)
  conv("head.cls_score", num_anchors * num_classes, 256, 3, bias=True, norm=False)
  conv("head.bbox_pred", num_anchors * 4, 256, 3, bias=True, norm=False)
  if rng is None:
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  return {k: (rng.uniform(0.5, 1.5, s) if k.endswith("running_var") else rng.normal(size=s)).astype(
      np.float32) for k, s in shapes.items()}


def detectron2_cell_anchors(sizes, ratios):
  """detectron2's DefaultAnchorGenerator.generate_cell_anchors: size-major loops."""
  anchors = []
  for size in sizes:
    for ratio in ratios:
      w = np.sqrt(size**2 / ratio)
      h = ratio * w
      anchors.append([-w / 2, -h / 2, w / 2, h / 2])
  return np.array(anchors)


def test_anchor_permutation_matches_detectron2_anchor_geometry():
  perm = weights.anchor_permutation(3, 3)
  np.testing.assert_array_equal(perm, [0, 3, 6, 1, 4, 7, 2, 5, 8])  # hand-computed
  config = anchor_lib.AnchorConfig(convention="detectron2")
  for level in range(3, 8):
    sizes = [4 * 2**level * 2 ** (k / 3) for k in range(3)]
    theirs = detectron2_cell_anchors(sizes, (0.5, 1.0, 2.0))
    ours = anchor_lib.cell_anchors(level, config=config)
    np.testing.assert_allclose(ours, theirs[perm], rtol=1e-5)


@pytest.fixture(scope="module")
def detectron2_r50():
  rng = np.random.default_rng(0)
  state_dict = detectron2_state_dict(depths=(3, 4, 6, 3), rng=rng)
  state_dict["pixel_mean"] = np.array([103.530, 116.280, 123.675]).reshape(3, 1, 1)
  state_dict["pixel_std"] = np.ones((3, 1, 1))
  config = retinanet.RetinaNetConfig(**weights.source_defaults("detectron2")["model"])
  return state_dict, config, weights.convert_state_dict(state_dict, source="detectron2",
                                                        model_config=config)


def test_detectron2_golden_mapping(detectron2_r50):
  d2, config, ours = detectron2_r50
  assert config.stride_in_1x1 and config.p6_input == "c5" and config.num_classes == 80

  def torch_conv(key):
    return d2[key].transpose(2, 3, 1, 0)

  np.testing.assert_array_equal(ours["backbone"]["stem"]["conv"]["kernel"],
                                torch_conv("backbone.bottom_up.stem.conv1.weight"))
  np.testing.assert_array_equal(ours["backbone"]["res3"][0]["conv1"]["norm"]["var"],
                                d2["backbone.bottom_up.res3.0.conv1.norm.running_var"])
  np.testing.assert_array_equal(ours["backbone"]["res4"][5]["conv2"]["conv"]["kernel"],
                                torch_conv("backbone.bottom_up.res4.5.conv2.weight"))
  np.testing.assert_array_equal(ours["backbone"]["res5"][0]["shortcut"]["norm"]["scale"],
                                d2["backbone.bottom_up.res5.0.shortcut.norm.weight"])
  np.testing.assert_array_equal(ours["fpn"]["laterals"][0]["kernel"],
                                torch_conv("backbone.fpn_lateral3.weight"))
  np.testing.assert_array_equal(ours["fpn"]["outputs"][2]["bias"], d2["backbone.fpn_output5.bias"])
  np.testing.assert_array_equal(ours["fpn"]["p6"]["kernel"], torch_conv("backbone.top_block.p6.weight"))
  np.testing.assert_array_equal(ours["head"]["classification"]["convs"][3]["kernel"],
                                torch_conv("head.cls_subnet.6.weight"))
  np.testing.assert_array_equal(ours["head"]["box"]["convs"][0]["bias"], d2["head.bbox_subnet.0.bias"])
  # Predictors: our anchor a = ratio * 3 + scale takes detectron2's anchor scale * 3 + ratio.
  cls_bias = d2["head.cls_score.bias"].reshape(9, 80)
  box_kernel = torch_conv("head.bbox_pred.weight").reshape(3, 3, 256, 9, 4)
  ours_cls = ours["head"]["classification"]["predictor"]["bias"].reshape(9, 80)
  ours_box = ours["head"]["box"]["predictor"]["kernel"].reshape(3, 3, 256, 9, 4)
  for ratio in range(3):
    for scale in range(3):
      np.testing.assert_array_equal(ours_cls[ratio * 3 + scale], cls_bias[scale * 3 + ratio])
      np.testing.assert_array_equal(ours_box[..., ratio * 3 + scale, :], box_kernel[..., scale * 3 + ratio, :])


def test_detectron2_model_outputs_follow_permuted_anchors(detectron2_r50):
  """Numerically: our logits at anchor a equal detectron2's output channel perm[a] * K + k, computed
  by running our network with the unpermuted predictor."""
  _, config, ours = detectron2_r50
  model = nnx.eval_shape(lambda: retinanet.build_model(config, rngs=nnx.Rngs(0)))
  checkpoints.load_into(model, ours)
  x = jax.random.normal(jax.random.key(0), (1, 64, 96, 3))
  logits, deltas = forward(model, x)
  # Undo the permutation in the predictors: the network then emits detectron2's order.
  inverse = np.argsort(weights.anchor_permutation(3, 3))
  for subnet in (model.head.classification, model.head.box):
    for name in ("kernel", "bias"):
      value = getattr(subnet.predictor, name)
      value[...] = jnp.asarray(weights.permute_anchors(np.asarray(value[...]), inverse))
  d2_logits, d2_deltas = forward(model, x)
  perm = weights.anchor_permutation(3, 3)
  for ours_out, theirs, k in ((logits, d2_logits, 80), (deltas, d2_deltas, 4)):
    theirs = np.asarray(theirs).reshape(1, -1, 9, k)[:, :, perm]
    np.testing.assert_allclose(np.asarray(ours_out).reshape(1, -1, 9, k), theirs, rtol=1e-5, atol=1e-5)


def test_detectron2_x101_keys_and_shapes():
  state_dict = detectron2_state_dict(depths=(3, 4, 23, 3), groups=32, width_per_group=8)
  defaults = weights.source_defaults("detectron2", backbone="resnext101_32x8d")
  assert defaults["input_convention"] == "caffe_fair" and not defaults["model"]["stride_in_1x1"]
  config = retinanet.RetinaNetConfig(**defaults["model"])
  converted = weights.convert_state_dict(state_dict, source="detectron2", model_config=config)
  assert converted["backbone"]["res4"][22]["conv2"]["conv"]["kernel"].shape == (3, 3, 32, 1024)  # 1024 / 32 groups


def test_conversion_errors_list_the_keys(detectron2_r50):
  d2, config, _ = detectron2_r50
  broken = dict(d2)
  del broken["backbone.fpn_lateral4.bias"]
  broken["head.cls_score.extra"] = np.zeros(3, np.float32)
  broken["head.bbox_pred.bias"] = np.zeros(35, np.float32)
  with pytest.raises(ValueError) as error:
    weights.convert_state_dict(broken, source="detectron2", model_config=config)
  message = str(error.value)
  assert "missing keys: ['backbone.fpn_lateral4.bias']" in message
  assert "unexpected keys: ['head.cls_score.extra']" in message
  assert "head.bbox_pred.bias: model (36,), checkpoint (35,)" in message
  with pytest.raises(ValueError, match="pixel_mean"):
    weights.convert_state_dict(dict(d2, pixel_mean=np.array([123.675, 116.28, 103.53])),
                               source="detectron2", model_config=config)


# ------------------------------------------------------------------------------------------------
# MSRA caffe2 ImageNet backbones.


def msra_state_dict(depths, rng):
  blobs = {"conv1_w": rng.normal(size=(64, 3, 7, 7)), "res_conv1_bn_s": rng.uniform(0.5, 1.5, 64),
           "res_conv1_bn_b": rng.normal(size=64), "fc1000_w": rng.normal(size=(1000, 2048)),
           "fc1000_b": rng.normal(size=1000), "conv1_w_momentum": np.zeros((64, 3, 7, 7))}
  in_c = 64
  for s, depth in enumerate(depths):
    planes = 64 * 2**s
    for i in range(depth):
      convs = [("branch2a", planes, in_c, 1), ("branch2b", planes, planes, 3),
               ("branch2c", planes * 4, planes, 1)] + ([("branch1", planes * 4, in_c, 1)] if i == 0 else [])
      for branch, out_c, c, k in convs:
        name = f"res{s + 2}_{i}_{branch}"
        blobs[name + "_w"] = rng.normal(size=(out_c, c, k, k))
        blobs[name + "_bn_s"] = rng.uniform(0.5, 1.5, out_c)
        blobs[name + "_bn_b"] = rng.normal(size=out_c)
      in_c = planes * 4
  return {k: v.astype(np.float32) for k, v in blobs.items()}


def test_msra_backbone_conversion_round_trip(tmp_path):
  blobs = msra_state_dict((3, 4, 6, 3), np.random.default_rng(0))
  path = tmp_path / "R-50.pkl"
  with open(path, "wb") as f:
    pickle.dump({"blobs": blobs}, f)
  description = weights.convert(str(path), str(tmp_path / "r50"), source="msra_backbone")
  assert description.kind == "backbone" and description.input_convention == "caffe"
  assert description.label_map is None
  assert description.model.stride_in_1x1
  full, loaded_description = checkpoints.read_model_state(str(tmp_path / "r50"))
  assert loaded_description == description and set(full) == {"backbone"}
  state = full["backbone"]
  np.testing.assert_array_equal(state["res2"][0]["shortcut"]["conv"]["kernel"],
                                blobs["res2_0_branch1_w"].transpose(2, 3, 1, 0))
  # Folded caffe2 batch norm: the frozen norm is exactly y = x * s + b.
  norm = resnet.FrozenBatchNorm(64)
  for name in ("scale", "bias", "mean", "var"):
    getattr(norm, name)[...] = jnp.asarray(state["stem"]["norm"][name])
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 64))
  np.testing.assert_allclose(jax.jit(lambda x: norm(x))(x),  # pylint: disable=unnecessary-lambda
                             x * blobs["res_conv1_bn_s"] + blobs["res_conv1_bn_b"], rtol=1e-5, atol=1e-6)
  with pytest.raises(checkpoints.CheckpointError, match="holds a backbone only"):
    checkpoints.load_model(str(tmp_path / "r50"))


# ------------------------------------------------------------------------------------------------
# torchvision: .pth file -> convert() -> checkpoint directory -> checkpoints.load_model(), vs torchvision.


def small_torchvision_retinanet():
  """torchvision's RetinaNet v1 layout on a ResNet-18 (fast), random weights and statistics."""
  torch.manual_seed(0)
  backbone = _resnet_fpn_extractor(torchvision.models.resnet18(), 5, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
  model = TorchRetinaNet(backbone, num_classes=91, min_size=96).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  return model


def test_torchvision_checkpoint_end_to_end(tmp_path):
  reference = small_torchvision_retinanet()
  path = str(tmp_path / "retinanet_r18.pth")
  torch.save(reference.state_dict(), path)
  description = weights.convert(path, str(tmp_path / "converted"), source="torchvision_v1",
                                backbone="resnet18", norm_epsilon=1e-5)
  with open(tmp_path / "converted" / "description.json") as f:
    assert json.load(f) == description.to_json()
  assert description.kind == "retinanet" and description.model.num_classes == 91
  assert description.anchors.convention == "torchvision"
  assert description.label_map.names[1] == "person" and description.label_map.category_ids[1] == 1
  assert os.path.isdir(tmp_path / "converted" / "model")

  model = checkpoints.load_model(str(tmp_path / "converted")).module()
  assert model.config.backbone == "resnet18" and model.config.p6_input == "p5"
  image = np.random.default_rng(0).integers(0, 256, (1, 83, 97, 3), dtype=np.uint8)
  batch, image_hw = preprocessing.batch_images(list(image), dtype=np.uint8)
  inputs = preprocessing.normalize_images(batch, image_hw)
  with torch.no_grad():
    features = list(reference.backbone(torch.from_numpy(np.array(inputs)).permute(0, 3, 1, 2)).values())
    expected = reference.head(features)
  logits, deltas = forward(model, inputs)
  np.testing.assert_allclose(logits, expected["cls_logits"].numpy(), atol=1e-4)
  np.testing.assert_allclose(deltas, expected["bbox_regression"].numpy(), atol=1e-4)

  # The backbone of a whole-model checkpoint loads into a model with other norms and freezing.
  backbone_state = checkpoints.read_model_state(str(tmp_path / "converted"))[0]["backbone"]
  other = nnx.eval_shape(lambda: retinanet.build_model(dict(backbone="resnet18", norm="sync_bn",
                                                           freeze_at=0), rngs=nnx.Rngs(1)))
  checkpoints.load_into(other.backbone, backbone_state)
  np.testing.assert_array_equal(other.backbone.res3[0].conv1.norm.mean[...],
                                reference.backbone.body.layer2[0].bn1.running_mean.numpy())
  with pytest.raises(ValueError, match="missing"):
    checkpoints.load_into(other, backbone_state)


def test_coco80_class_slicing():
  reference = small_torchvision_retinanet()
  state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
  fields = dict(weights.source_defaults("torchvision_v1", backbone="resnet18")["model"], num_classes=80)
  converted = weights.convert_state_dict(state_dict, source="torchvision_v1", class_mapping="coco80",
                                         model_config=retinanet.RetinaNetConfig(**fields))
  theirs = state_dict["head.classification_head.cls_logits.bias"].reshape(9, 91)
  ours = converted["head"]["classification"]["predictor"]["bias"].reshape(9, 80)
  np.testing.assert_array_equal(ours, theirs[:, list(weights.COCO_80_IDS)])
  kernel = converted["head"]["classification"]["predictor"]["kernel"].reshape(3, 3, 256, 9, 80)
  theirs_kernel = state_dict["head.classification_head.cls_logits.weight"].reshape(9, 91, 256, 3, 3)
  np.testing.assert_array_equal(kernel[1, 2, 7, 4, 0], theirs_kernel[4, 1, 7, 1, 2])  # person
  assert weights.label_map_for("torchvision_v1", "coco80", 80).names[0] == "person"
  with pytest.raises(ValueError, match="class_mapping='coco80' applies to torchvision detection"):
    weights.convert_state_dict(state_dict, source="detectron2", class_mapping="coco80",
                               model_config=retinanet.RetinaNetConfig())


def test_torchvision_imagenet_backbone_ignores_fc():
  reference = torchvision.models.resnet18()
  state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
  assert "fc.weight" in state_dict
  converted = weights.convert_state_dict(state_dict, source="torchvision_backbone",
                                         model_config=retinanet.RetinaNetConfig(backbone="resnet18"))
  assert set(converted) == {"backbone"}
  np.testing.assert_array_equal(converted["backbone"]["res5"][1]["conv2"]["norm"]["scale"],
                                state_dict["layer4.1.bn2.weight"])


def test_torchvision_v1_norm_epsilon_from_the_file_hash_or_required(tmp_path, monkeypatch):
  path = str(tmp_path / "retinanet_r18.pth")
  torch.save(small_torchvision_retinanet().state_dict(), path)
  # Not torchvision's published file: no silent 0.0 (off by up to 0.07 px), a clear request instead.
  with pytest.raises(ValueError, match=r"retinanet_r18\.pth: not one of the published torchvision_v1 "
                     r"files \(its SHA-256 starts [0-9a-f]{8}; known: \['eeacb38b'\]\).*give norm_epsilon"):
    weights.convert(path, str(tmp_path / "a"), source="torchvision_v1", backbone="resnet18")
  assert not os.path.exists(tmp_path / "a")
  # The published file is recognized by its hash (here: this file registered as if it were).
  prefix = hashlib.sha256(open(path, "rb").read()).hexdigest()[:8]
  assert weights.sha256_prefix(path) == prefix
  monkeypatch.setitem(weights.KNOWN_NORM_EPSILON, "torchvision_v1", {"eeacb38b": 0.0, prefix: 0.0})
  description = weights.convert(path, str(tmp_path / "b"), source="torchvision_v1", backbone="resnet18")
  assert description.model.norm_epsilon == 0.0
  # An explicit value wins and needs no hash.
  monkeypatch.setitem(weights.KNOWN_NORM_EPSILON, "torchvision_v1", {})
  description = weights.convert(path, str(tmp_path / "c"), source="torchvision_v1", backbone="resnet18",
                                norm_epsilon=1e-5)
  assert description.model.norm_epsilon == 1e-5
