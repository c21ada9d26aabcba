"""RetinaNet against torchvision's retinanet_resnet50_fpn (v1) and _v2 with converted random weights."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import boxes as box_lib
from retinanet_jax.checkpoints import weights
from retinanet_jax.models import preprocessing, retinanet

from torchvision_reference import (convert_torchvision, find_photo, match_detections, our_detections,
                       parity_images, to_torch_images, torchvision_detections)


forward = nnx.jit(lambda model, images: model(images))


@pytest.mark.parametrize("builder, expected", [(retinanet_resnet50_fpn, 34_068_119),
                                               (retinanet_resnet50_fpn_v2, 38_198_935)])
def test_parameter_count_equals_torchvision(builder, expected):
  source = "torchvision_v1" if builder is retinanet_resnet50_fpn else "torchvision_v2"
  config = retinanet.RetinaNetConfig(**weights.source_defaults(source)["model"])
  abstract = nnx.eval_shape(lambda: retinanet.build_model(config, rngs=nnx.Rngs(0)))
  torch_count = sum(p.numel() for p in builder(weights=None, weights_backbone=None).parameters())
  assert torch_count == expected
  assert retinanet.count_parameters(abstract) == expected


SMALL = dict(backbone="resnet18", num_classes=3, freeze_at=0, head_num_convs=1, fpn_channels=32)


def test_build_model_from_config_dict_and_errors():
  model = retinanet.build_model(ml_collections.ConfigDict(SMALL), rngs=nnx.Rngs(0))
  assert model.config == retinanet.RetinaNetConfig(**SMALL)
  images = jnp.zeros((2, 67, 45, 3))
  logits, deltas = forward(model, images)
  num_anchors = anchor_lib.num_anchors((67, 45))
  assert logits.shape == (2, num_anchors, 3) and deltas.shape == (2, num_anchors, 4)
  assert logits.dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown model config fields.*'num_class'"):
    retinanet.build_model(dict(num_class=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dtype must be one of"):
    retinanet.RetinaNetConfig(dtype="float16")
  with pytest.raises(ValueError, match="norm must be one of"):
    retinanet.RetinaNetConfig(norm="batch_norm")
  with pytest.raises(ValueError, match="p6_input must be one of"):
    nnx.eval_shape(lambda: retinanet.build_model(dict(p6_input="c6"), rngs=nnx.Rngs(0)))


def test_initial_classification_probability_is_prior():
  model = retinanet.build_model(dict(SMALL, prior_prob=0.01), rngs=nnx.Rngs(1))
  images = jax.random.normal(jax.random.key(0), (2, 67, 45, 3))
  logits, _ = forward(model, images)
  np.testing.assert_allclose(jax.nn.sigmoid(logits).mean(), 0.01, rtol=0.05)


def _normalized_batch(images):
  batch, image_hw = preprocessing.batch_images(images, dtype=np.uint8)
  return batch, image_hw, jax.jit(preprocessing.normalize_images)(batch, image_hw)


def test_network_outputs_match_torchvision(torchvision_pair):
  source, torch_model, model = torchvision_pair
  batch, _, inputs = _normalized_batch(parity_images())
  # torchvision's own transform gives the same normalized, padded batch.
  image_list, _ = torch_model.transform(to_torch_images(parity_images()))
  np.testing.assert_allclose(inputs, image_list.tensors.permute(0, 2, 3, 1).numpy(), atol=1e-6)
  assert inputs.shape[1:3] == (192, 224)
  with torch.no_grad():
    ref = torch_model.head(list(torch_model.backbone(image_list.tensors).values()))
  logits, deltas = forward(model, inputs)
  for ours, theirs in ((logits, ref["cls_logits"]), (deltas, ref["bbox_regression"])):
    theirs = theirs.numpy()
    assert ours.shape == theirs.shape
    rel = float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())
    print(f"{source}: max |ours - torchvision| / max |torchvision| = {rel:.2e}")
    assert rel < 1e-4


def test_detections_match_torchvision(torchvision_pair):
  source, torch_model, model = torchvision_pair
  images = parity_images()
  with torch.no_grad():
    reference = torch_model(to_torch_images(images))
  batch, image_hw, _ = _normalized_batch(images)
  detections = retinanet.detect(model, batch, image_hw, np.ones((2, 2), np.float32),
                                max_detections=1000)
  for b in range(2):
    ref = torchvision_detections(reference[b])
    ours = our_detections(detections, b)
    assert 20 < len(ref["scores"]) < 1000  # enough detections to mean something, none cut off
    result = match_detections(ours, ref, box_tol=1e-2, score_tol=1e-4)
    print(f"{source} image {b}: {len(ref['scores'])} detections, {result}")
    assert not result["unmatched"] and result["extra"] == 0


def test_bfloat16_top_detections_match_float32(torchvision_pair):
  source, torch_model, model32 = torchvision_pair
  model16 = convert_torchvision(torch_model, source, dtype="bfloat16")
  batch, image_hw, inputs = _normalized_batch(parity_images())
  scale = np.ones((2, 2), np.float32)
  logits16, deltas16 = forward(model16, inputs)
  logits32, deltas32 = forward(model32, inputs)
  assert logits16.dtype == jnp.float32  # float32 outputs, bfloat16 compute
  assert model16.backbone.stem.conv.kernel[...].dtype == jnp.float32
  print(f"{source} bfloat16 vs float32: max logit diff {float(jnp.abs(logits16 - logits32).max()):.3f}"
        f" (logit range {float(logits32.min()):.1f}..{float(logits32.max()):.1f}), "
        f"max delta diff {float(jnp.abs(deltas16 - deltas32).max()):.3f}")
  det16 = retinanet.detect(model16, batch, image_hw, scale, max_detections=1000)
  det32 = retinanet.detect(model32, batch, image_hw, scale, max_detections=1000)
  for b in range(2):
    top = {k: v[:10] for k, v in our_detections(det32, b).items()}
    ours = our_detections(det16, b)
    result = match_detections(ours, top, box_tol=2.0, score_tol=0.02)
    print(f"{source} image {b}: top-10 float32 detections vs bfloat16: {result}")
    # A top detection may be missing only where NMS decided otherwise near its IoU threshold: then a
    # same-class bfloat16 detection overlaps it by about 0.5 with a score at least as high.
    assert len(result["unmatched"]) <= 2
    for i in result["unmatched"]:
      iou = np.asarray(box_lib.pairwise_iou(top["boxes"][i][None], ours["boxes"]))[0]
      competitor = (ours["classes"] == top["classes"][i]) & (iou > 0.4) & (
          ours["scores"] >= top["scores"][i] - 0.02)
      assert competitor.any(), f"float32 detection {i} has no bfloat16 counterpart or suppressor"


def test_full_pipeline_on_a_photo_matches_torchvision(torchvision_v2_pair):
  """Arbitrary-size photo: our host resize + device normalization + network + post-processing vs
  torchvision's model(images) with its default 800/1333 resizing (v2 only: the resizing and the
  mapping back to original pixels do not depend on the version)."""
  source, torch_model, model = torchvision_v2_pair
  photo, origin = find_photo()
  print(f"photo: {origin} {photo.shape}")
  crop = photo[37:37 + 301, 11:11 + 407]  # a second, differently shaped image
  originals = [photo, crop]
  torch_model.transform.min_size, torch_model.transform.max_size = (800,), 1333
  try:
    with torch.no_grad():
      reference = torch_model(to_torch_images(originals))
  finally:
    torch_model.transform.min_size = (150,)
  resized, scales = [], []
  for image in originals:
    size = preprocessing.torchvision_resized_size(*image.shape[:2])
    resized.append(preprocessing.resize_bilinear(image, size))
    scales.append([size[0] / image.shape[0], size[1] / image.shape[1]])
  batch, image_hw = preprocessing.batch_images(resized)
  assert batch.shape[1] % 32 == 0 and batch.shape[2] % 32 == 0
  detections = retinanet.detect(model, batch, image_hw, np.asarray(scales, np.float32),
                                max_detections=1000)
  for b, image in enumerate(originals):
    ref = torchvision_detections(reference[b])
    ours = our_detections(detections, b)
    assert len(ref["scores"]) > 10
    assert ours["boxes"][:, 2].max() <= image.shape[1] + 1e-3  # original-image pixels
    assert ours["boxes"][:, 3].max() <= image.shape[0] + 1e-3
    result = match_detections(ours, ref, box_tol=1.0, score_tol=1e-3)
    print(f"{source} photo {b} {image.shape[:2]}: {len(ref['scores'])} detections, {result}")
    # Scores within 1e-3 of the threshold (0.05) or of another may legitimately swap in or out.
    borderline = [i for i in result["unmatched"] if ref["scores"][i] < 0.05 + 1e-3]
    assert result["unmatched"] == borderline and result["extra"] <= len(borderline) + 1
