"""The faster preprocess (non-finite check by one reduction, uint8 flip, zero-concatenation pad,
resize from float32, fused round-and-cast) gives exactly the bytes of the pre-change one
(reference_transforms_v1.py) for a fixed seed: every output key, both modes, flipped and not, and
with NaN/inf/out-of-range pixels from a broken resize. The training pipeline (images padded while
batching) gives exactly the batches of the pre-change pipeline (v1 preprocess, then batch)."""

import numpy as np
import pytest
import tensorflow as tf

import reference_transforms_v1 as reference
from data_test_utils import assert_tree_equal
from retinanet_jax.data import config as config_lib, make_train_input, transforms


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


@pytest.mark.parametrize("hw", [(16, 20), (30, 37), (60, 80), (97, 131)])
def test_resize_from_float32_or_uint8_gives_tf_image_resize_values(hw):
  """_resize casts to float32 first unless it shrinks below half the pixels: the same values."""
  image = tf.constant(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
  got = tf.function(transforms._resize)(image, tf.constant(hw))  # pylint: disable=protected-access
  want = tf.image.resize(image, hw, method="bilinear", antialias=False)
  assert got.dtype == tf.float32 and got.shape == (*hw, 3)
  np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_round_to_uint8_is_saturate_cast_of_round():
  """Ties go to even, out-of-range values (and +-inf) are clipped, like saturate_cast(round(x))."""
  rng = np.random.default_rng(3)
  x = np.concatenate([rng.uniform(-300, 600, 20000), np.arange(-3, 258, 0.5),
                      [0.49999997, 0.5, 1.5, 254.5, 255.5, -0.5, 1e30, -1e30, np.inf, -np.inf]])
  x = tf.constant(x.astype(np.float32))
  got = tf.function(transforms._round_to_uint8)(x)  # pylint: disable=protected-access
  assert got.dtype == tf.uint8
  np.testing.assert_array_equal(got.numpy(), tf.saturate_cast(tf.round(x), tf.uint8).numpy())
  np.testing.assert_array_equal(got.numpy()[-10:], [0, 0, 2, 254, 255, 0, 255, 0, 255, 0])


def _v1_preprocess(example, *, config, train, seed, image_padding=None):
  """The pre-change preprocess behind the current one's signature (always padded)."""
  del image_padding
  v1_config = reference.TransformConfig(**{f: (reference.Mode(getattr(config, f).value)
                                               if f == "mode" else getattr(config, f))
                                           for f in config.__dataclass_fields__})
  return reference.preprocess(example, config=v1_config, train=train, seed=seed)


@pytest.mark.parametrize("mode", ["resize", "lsj"])
def test_training_batches_are_those_of_the_pre_change_pipeline(tiny_synthetic_config, mode,
                                                               monkeypatch):
  c = tiny_synthetic_config.copy_and_resolve_references()
  c.mode, c.hflip_prob = mode, 0.5
  c.train_min_size_range, c.max_size = (40, 88), 96  # up- and down-scaling
  c.image_size, c.scale_range = 64, (0.3, 1.8)
  new = make_train_input(c, global_batch_size=4, mesh=None, process_index=0, process_count=1)
  new_batches = [new.next_numpy() for _ in range(3)]
  monkeypatch.setattr(transforms, "preprocess", _v1_preprocess)
  old = make_train_input(c, global_batch_size=4, mesh=None, process_index=0, process_count=1)
  old_batches = [old.next_numpy() for _ in range(3)]
  assert new_batches[0]["image"].shape == (4, *transforms.padded_hw(
      transforms.TransformConfig.from_data_config(c)), 3)
  assert len({b["image_hw"][:, 0].tobytes() for b in new_batches}) > 1  # several sizes padded
  for new_batch, old_batch in zip(new_batches, old_batches):
    assert_tree_equal(new_batch, old_batch)
