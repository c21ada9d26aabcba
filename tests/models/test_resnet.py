"""ResNet / ResNeXt backbones against torchvision.models, freezing, and the three normalizations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from retinanet_jax import checkpoints
from retinanet_jax.checkpoints import weights
from retinanet_jax.models import retinanet, resnet

forward = nnx.jit(lambda model, images: model(images))


def _trainable_and_frozen(module):
  trainable = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
  frozen = sum(x.size for x in jax.tree.leaves(nnx.state(module, resnet.FrozenParam)))
  return trainable, frozen


@pytest.mark.parametrize("architecture", sorted(resnet.ARCHITECTURES))
def test_parameter_count_equals_torchvision(architecture):
  config = resnet.ResNetConfig(architecture, freeze_at=0)
  ours = nnx.eval_shape(lambda: resnet.ResNet(config, rngs=nnx.Rngs(0)))
  with torch.device("meta"):
    reference = getattr(torchvision.models, architecture)()
  expected = sum(p.numel() for name, p in reference.named_parameters() if not name.startswith("fc."))
  assert retinanet.count_parameters(ours) == expected


def _random_batchnorm_statistics(model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) - 0.5)
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
        module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
        module.bias.copy_(torch.rand(module.bias.shape, generator=gen) - 0.5)


def _torchvision_features(model, x):
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  c2 = model.layer1(x)
  c3 = model.layer2(c2)
  c4 = model.layer3(c3)
  return c3, c4, model.layer4(c4)


def _converted_backbone(reference, config):
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  model_config = retinanet.RetinaNetConfig(backbone=config.architecture,
                                           stride_in_1x1=config.stride_in_1x1)
  converted = weights.convert_state_dict(state, source="torchvision_backbone", model_config=model_config)
  ours = nnx.eval_shape(lambda: resnet.ResNet(config, rngs=nnx.Rngs(0)))
  checkpoints.load_into(ours, converted["backbone"])
  return ours


@pytest.mark.parametrize("architecture, stride_in_1x1", [("resnet18", False),
                                                          ("resnext50_32x4d", False),
                                                          ("resnet50", True)])
def test_features_match_torchvision(architecture, stride_in_1x1):
  """C3-C5 on an odd-sized input. `stride_in_1x1` is checked against a torchvision ResNet-50 whose
  first blocks were edited to stride in conv1 (the MSRA layout)."""
  torch.manual_seed(0)
  reference = getattr(torchvision.models, architecture)().eval()
  _random_batchnorm_statistics(reference)
  if stride_in_1x1:
    for layer in (reference.layer2, reference.layer3, reference.layer4):
      layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
  x = np.random.default_rng(0).normal(size=(2, 3, 75, 93)).astype(np.float32)
  with torch.no_grad():
    expected = _torchvision_features(reference, torch.from_numpy(x))
  ours = _converted_backbone(reference, resnet.ResNetConfig(architecture,
                                                           stride_in_1x1=stride_in_1x1))
  features = forward(ours, jnp.asarray(x.transpose(0, 2, 3, 1)))
  for level, (got, want) in enumerate(zip(features, expected), start=3):
    want = want.numpy().transpose(0, 2, 3, 1)
    assert got.shape == want.shape == (2, -(-75 // 2**level), -(-93 // 2**level), want.shape[-1])
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


def test_stride_position():
  config = resnet.ResNetConfig("resnet50", stride_in_1x1=True)
  caffe = nnx.eval_shape(lambda: resnet.ResNet(config, rngs=nnx.Rngs(0)))
  torchvision_style = nnx.eval_shape(lambda: resnet.ResNet(resnet.ResNetConfig(), rngs=nnx.Rngs(0)))
  assert (caffe.res3[0].conv1.conv.strides, caffe.res3[0].conv2.conv.strides) == (2, 1)
  assert (torchvision_style.res3[0].conv1.conv.strides,
          torchvision_style.res3[0].conv2.conv.strides) == (1, 2)
  assert caffe.res3[0].shortcut.conv.strides == 2 and caffe.res2[0].conv1.conv.strides == 1


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at_marks_frozen_weights(freeze_at):
  for norm in ("frozen_bn", "group_norm"):
    model = nnx.eval_shape(lambda: resnet.ResNet(  # pylint: disable=cell-var-from-loop
        resnet.ResNetConfig("resnet18", norm=norm, freeze_at=freeze_at), rngs=nnx.Rngs(0)))
    for index, name in enumerate(("stem",) + resnet.STAGES):
      part = getattr(model, name)
      trainable, frozen = _trainable_and_frozen(part)
      if index < freeze_at:
        assert trainable == 0 and frozen > 0, (norm, name)
      elif norm == "frozen_bn":  # convolutions train, frozen batch norms never do
        conv_weights = sum(x.size for path, x in nnx.to_flat_state(nnx.state(part, nnx.Param)))
        assert conv_weights == trainable > 0
        assert all(path[-2] == "conv" for path, _ in nnx.to_flat_state(nnx.state(part, nnx.Param)))
      else:
        assert frozen == 0 and trainable > 0, (norm, name)


def test_gradients_skip_frozen_parameters():
  model = resnet.ResNet(resnet.ResNetConfig("resnet18", freeze_at=2), rngs=nnx.Rngs(0))

  @nnx.jit
  def grads(model, x):
    return nnx.grad(lambda m: sum(jnp.sum(f) for f in m(x)))(model)

  g = grads(model, jnp.ones((1, 32, 32, 3)))
  paths = [path for path, _ in nnx.to_flat_state(g)]
  assert paths and not any(path[0] in ("stem", "res2") for path in paths)
  assert not any(path[-2] == "norm" for path in paths)  # frozen batch norm affine


def test_sync_bn_in_frozen_stages_is_frozen_batch_norm():
  model = nnx.eval_shape(lambda: resnet.ResNet(
      resnet.ResNetConfig("resnet18", norm="sync_bn", freeze_at=2), rngs=nnx.Rngs(0)))
  assert isinstance(model.stem.norm, resnet.FrozenBatchNorm)
  assert isinstance(model.res2[0].conv1.norm, resnet.FrozenBatchNorm)
  assert isinstance(model.res3[0].conv1.norm, nnx.BatchNorm)
  assert model.res3[0].conv1.norm.axis_name == "data"


def test_sync_bn_statistics_span_devices():
  """Training-mode BatchNorm under shard_map over 4 devices (one image each) equals BatchNorm on the
  whole batch on one device: outputs and updated running statistics."""
  assert jax.device_count() >= 4, "tests/conftest.py should give 4 host devices"
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  x = jax.random.normal(jax.random.key(0), (4, 37, 29, 3))
  synced = resnet.ResNet(resnet.ResNetConfig("resnet18", norm="sync_bn", freeze_at=0),
                         rngs=nnx.Rngs(0))
  local = resnet.ResNet(resnet.ResNetConfig("resnet18", norm="sync_bn", freeze_at=0,
                                            norm_axis_name=None), rngs=nnx.Rngs(0))
  synced.train()
  local.train()

  @nnx.jit
  @nnx.shard_map(mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
  def sharded_forward(model, images):
    return model(images)[-1]

  got = sharded_forward(synced, x)
  want = forward(local, x)[-1]
  np.testing.assert_allclose(got, want, atol=1e-4 * float(jnp.abs(want).max()))
  for norm_a, norm_b in ((synced.res5[1].conv2.norm, local.res5[1].conv2.norm),
                         (synced.stem.norm, local.stem.norm)):
    np.testing.assert_allclose(norm_a.mean[...], norm_b.mean[...], atol=1e-5)
    np.testing.assert_allclose(norm_a.var[...], norm_b.var[...], rtol=1e-4)
    assert float(jnp.abs(norm_a.mean[...]).max()) > 0  # statistics were updated


def test_group_norm_backbone_runs():
  model = resnet.ResNet(resnet.ResNetConfig("resnet18", norm="group_norm", freeze_at=0),
                        rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  c3, c4, c5 = forward(model, jnp.ones((1, 45, 61, 3)))
  assert (c3.shape, c4.shape, c5.shape) == ((1, 6, 8, 128), (1, 3, 4, 256), (1, 2, 2, 512))
  assert bool(jnp.all(jnp.isfinite(c5)))


def test_config_errors():
  with pytest.raises(ValueError, match="architecture must be one of"):
    resnet.ResNetConfig("resnet51")
  with pytest.raises(ValueError, match="freeze_at must be in 0..5"):
    resnet.ResNetConfig(freeze_at=6)
  with pytest.raises(ValueError, match="norm must be one of"):
    resnet.ResNetConfig(norm="bn")
