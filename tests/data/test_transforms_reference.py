"""The faster preprocess (non-finite check by one reduction, uint8 flip, zero-concatenation pad)
gives exactly the bytes of the pre-change one (reference_transforms_v1.py) for a fixed seed: every
output key, both modes, flipped and not, and with NaN/inf/out-of-range pixels from a broken resize."""

import numpy as np
import pytest
import tensorflow as tf

import reference_transforms_v1 as reference
from retinanet_jax.data import config as config_lib, transforms


def _config(mode):
  c = config_lib.default_data_config()
  c.mode, c.image_size, c.max_size, c.train_min_size_range = mode, 64, 80, (40, 56)
  c.eval_min_size, c.scale_range, c.pad_multiple, c.max_boxes = 48, (0.3, 2.0), 32, 4
  c.hflip_prob = 0.5
  return c


def _example(rng, h, w):
  x1, y1 = rng.uniform(0, w / 2, 5), rng.uniform(0, h / 2, 5)
  boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, 5), y1 + rng.uniform(1, h / 2, 5)], 1)
  return {"image": tf.constant(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
          "boxes": tf.constant(boxes, tf.float32), "labels": tf.constant(np.arange(5), tf.int32),
          "is_crowd": tf.constant([False, True, False, False, True]),
          "image_id": tf.constant(7, tf.int64), "original_hw": tf.constant([h, w], tf.int32)}


def _compare(mode, train, examples, seeds):
  c = _config(mode)
  new = tf.function(lambda e, s: transforms.preprocess(
      e, config=transforms.TransformConfig.from_data_config(c), train=train, seed=s))
  old = tf.function(lambda e, s: reference.preprocess(
      e, config=reference.TransformConfig.from_data_config(c), train=train, seed=s))
  for example in examples:
    for seed in seeds:
      s = tf.constant([3, seed], tf.int64)
      a, b = new(example, s), old(example, s)
      assert sorted(a) == sorted(b)
      for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=f"{mode} {key}")
  return a


def _flip_draws(seeds):
  """preprocess's flip decision (hflip_prob 0.5) for each seed: both branches must be compared."""
  return {bool(tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_split(
      tf.constant([3, s], tf.int64), 5)[3]) < 0.5) for s in seeds}


@pytest.mark.parametrize("mode", ["resize", "lsj"])
@pytest.mark.parametrize("train", [True, False])
def test_preprocess_bytes_are_unchanged(mode, train):
  rng = np.random.default_rng(0)
  examples = [_example(rng, 37, 53), _example(rng, 60, 41), _example(rng, 48, 48)]
  _compare(mode, train, examples, seeds=range(8) if train else [0])
  assert _flip_draws(range(8)) == {True, False}


def test_nonfinite_and_out_of_range_pixels_are_treated_the_same(monkeypatch):
  def broken_resize(image, hw):
    out = tf.image.resize(image, hw, method="bilinear", antialias=False)
    bad = tf.tensor_scatter_nd_update(out, [[0, 0, 0], [1, 2, 1], [2, 1, 2], [3, 3, 0]],
                                      [np.nan, np.inf, 300.0, -7.0])
    return bad
  monkeypatch.setattr(transforms, "_resize", broken_resize)
  monkeypatch.setattr(reference, "_resize", broken_resize)
  out = _compare("resize", True, [_example(np.random.default_rng(1), 30, 30)], seeds=range(4))
  assert int(out["num_nonfinite_pixels"]) == 2
