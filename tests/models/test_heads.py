"""RetinaNet heads: initialization, output layout (channel a * K + k), GroupNorm variant."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retinanet_jax.models import heads

forward = nnx.jit(lambda model, features: model(features))


def test_initialization():
  head = heads.RetinaNetHead(64, num_classes=7, num_anchors=9, rngs=nnx.Rngs(0))
  cls_bias = np.asarray(head.classification.predictor.bias[...])
  np.testing.assert_allclose(cls_bias, -math.log(99.0), rtol=1e-6)  # pi = 0.01
  np.testing.assert_array_equal(head.box.predictor.bias[...], 0.0)
  assert cls_bias.shape == (63,) and head.box.predictor.bias[...].shape == (36,)
  for conv in list(head.classification.convs) + [head.classification.predictor]:
    np.testing.assert_allclose(np.std(conv.kernel[...]), 0.01, rtol=0.1)
  for conv in head.box.convs:
    np.testing.assert_array_equal(conv.bias[...], 0.0)
  assert len(head.classification.convs) == 4 and not head.classification.norms


def test_group_norm_head_has_no_conv_bias():
  head = heads.RetinaNetHead(64, num_classes=3, norm="group_norm", rngs=nnx.Rngs(0))
  assert all(conv.bias is None for conv in head.classification.convs)
  assert len(head.box.norms) == 4 and head.box.norms[0].num_groups == 32
  with pytest.raises(ValueError, match="head norm must be one of"):
    heads.RetinaNetHead(64, num_classes=3, norm="batch_norm", rngs=nnx.Rngs(0))


def test_output_layout_is_anchor_major_per_location():
  """Predictor channel c = a * K + k lands at row (y * w + x) * A + a, column k, levels P3 first."""
  num_classes, num_anchors = 5, 3
  head = heads.RetinaNetHead(32, num_classes=num_classes, num_anchors=num_anchors, num_convs=1,
                             rngs=nnx.Rngs(0))
  for subnet in (head.classification, head.box):
    subnet.predictor.kernel[...] = jnp.zeros_like(subnet.predictor.kernel[...])
    subnet.predictor.bias[...] = jnp.arange(subnet.predictor.bias[...].shape[0], dtype=jnp.float32)
  shapes = [(3, 4), (2, 2)]
  features = [jnp.ones((2, h, w, 32)) for h, w in shapes]
  logits, deltas = forward(head, features)
  assert logits.shape == (2, (12 + 4) * num_anchors, num_classes)
  assert deltas.shape == (2, (12 + 4) * num_anchors, 4)
  row = (2 * 4 + 1) * num_anchors + 2  # level P3, y=2, x=1, anchor 2
  np.testing.assert_array_equal(logits[1, row], 2 * num_classes + np.arange(num_classes))
  np.testing.assert_array_equal(deltas[0, row], 2 * 4 + np.arange(4))
  row = 12 * num_anchors + (1 * 2 + 0) * num_anchors + 1  # level P4, y=1, x=0, anchor 1
  np.testing.assert_array_equal(logits[0, row], num_classes + np.arange(num_classes))


def test_prior_probability_must_be_a_probability():
  with pytest.raises(ValueError, match="prior_prob must be in"):
    heads.classification_bias(1.0)
