"""FPN against torchvision's FeaturePyramidNetwork + LastLevelP6P7 on odd-sized feature maps."""

from collections import OrderedDict

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from retinanet_jax.models import fpn as fpn_lib

forward = nnx.jit(lambda model, *features: model(*features))


@pytest.mark.parametrize("in_size, out_size", [(3, 6), (13, 25), (7, 13), (4, 7), (5, 5), (2, 9),
                                               (10, 13)])
def test_nearest_indices_match_pytorch(in_size, out_size):
  x = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size, 1)
  expected = F.interpolate(x, size=(out_size, 1), mode="nearest").reshape(-1).long().numpy()
  np.testing.assert_array_equal(fpn_lib.nearest_indices(in_size, out_size), expected)


def test_upsample_nearest_matches_pytorch():
  x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
  for size in [(10, 8), (9, 7), (13, 11)]:
    expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="nearest")
    got = nnx.jit(fpn_lib.upsample_nearest, static_argnums=1)(jnp.asarray(x), size)
    np.testing.assert_array_equal(got, expected.permute(0, 2, 3, 1).numpy())


def _load_into_torch(ours, reference):
  """Copies our FPN weights into torchvision's modules (the mapping, written out by hand)."""
  def conv(src, dst):
    dst.weight.copy_(torch.from_numpy(np.asarray(src.kernel[...]).transpose(3, 2, 0, 1).copy()))
    dst.bias.copy_(torch.from_numpy(np.asarray(src.bias[...]).copy()))

  fpn, extra = reference
  with torch.no_grad():
    for i in range(3):
      conv(ours.laterals[i], fpn.inner_blocks[i][0])
      conv(ours.outputs[i], fpn.layer_blocks[i][0])
    conv(ours.p6, extra.p6)
    conv(ours.p7, extra.p7)


@pytest.mark.parametrize("p6_input", ["c5", "p5"])
def test_fpn_matches_torchvision(p6_input):
  in_channels = (16, 24, 32)
  extra = LastLevelP6P7(32 if p6_input == "c5" else 8, 8)
  assert extra.use_P5 == (p6_input == "p5")
  reference = FeaturePyramidNetwork(list(in_channels), 8, extra_blocks=extra).eval()
  ours = fpn_lib.FPN(in_channels, 8, p6_input=p6_input, rngs=nnx.Rngs(0))
  _load_into_torch(ours, (reference, extra))
  rng = np.random.default_rng(0)
  # A 75 x 101 image: C3..C5 are 10x13, 5x7, 3x4 (odd sizes: upsampling must crop).
  shapes = [(10, 13), (5, 7), (3, 4)]
  features = [rng.normal(size=(2, c) + s).astype(np.float32) for c, s in zip(in_channels, shapes)]
  with torch.no_grad():
    expected = reference(OrderedDict((str(i), torch.from_numpy(f)) for i, f in enumerate(features)))
  got = forward(ours, *[jnp.asarray(f.transpose(0, 2, 3, 1)) for f in features])
  assert [g.shape[1:3] for g in got] == [(10, 13), (5, 7), (3, 4), (2, 2), (1, 1)]
  for g, e in zip(got, expected.values()):
    np.testing.assert_allclose(g, e.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_fpn_rejects_unknown_p6_input():
  with pytest.raises(ValueError, match="p6_input must be one of"):
    fpn_lib.FPN((16, 24, 32), 8, p6_input="c6", rngs=nnx.Rngs(0))
