"""matching.py against torchvision's Matcher and a hand-computed golden case, under jax.jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as tv_det_utils

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import matching

# The golden case, by hand. IoU (anchors x gt):
#         G0    G1    G2
#   A0 [ 1,    0,    0   ]
#   A1 [ 1/3,  1/3,  0   ]
#   A2 [ 0,    0,    0.5 ]
#   A3 [ 0,    0,    0   ]
ANCHORS = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [100, 100, 110, 110]], np.float32)
GT = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [20, 20, 30, 40]], np.float32)
MASK = np.ones(3, bool)


def jit_match(**kwargs):
  return jax.jit(functools.partial(matching.match_anchors, **kwargs))


def torchvision_matches(anchors, gt, *, low_quality=True, thresholds=(0.5, 0.4)):
  matcher = tv_det_utils.Matcher(thresholds[0], thresholds[1], allow_low_quality_matches=low_quality)
  if gt.shape[0] == 0:
    return np.full(anchors.shape[0], -1)
  return matcher(torchvision.ops.box_iou(torch.from_numpy(gt), torch.from_numpy(np.array(anchors)))).numpy()


def test_golden_ties():
  r = jit_match()(ANCHORS, GT, MASK)
  # A1 is promoted by G1 (its best anchor) but matched to its own best box, G0 (first on the tie).
  np.testing.assert_array_equal(r.state, [1, 1, 1, 0])
  np.testing.assert_array_equal(r.to_torchvision(), [0, 0, 2, -1])
  np.testing.assert_array_equal(r.to_torchvision(), torchvision_matches(ANCHORS, GT))


def test_golden_force_and_none():
  forced = jit_match(low_quality="force")(ANCHORS, GT, MASK)
  np.testing.assert_array_equal(forced.to_torchvision(), [0, 1, 2, -1])  # A1 goes to G1, its picker
  none = jit_match(low_quality="none")(ANCHORS, GT, MASK)
  np.testing.assert_array_equal(none.to_torchvision(), [0, -1, 2, -1])
  between = jit_match(low_quality="none", negative_threshold=0.3)(ANCHORS, GT, MASK)
  np.testing.assert_array_equal(between.state, [1, -1, 1, 0])
  np.testing.assert_array_equal(
      between.to_torchvision(),
      torchvision_matches(ANCHORS, GT, low_quality=False, thresholds=(0.5, 0.3)))


def test_golden_crowd_and_padding():
  crowd = np.array([False, False, True])
  r = jit_match()(ANCHORS, GT, MASK, gt_is_crowd=crowd)
  np.testing.assert_array_equal(r.state, [1, 1, -1, 0])  # A2's best box is the crowd box: ignored
  # A padded slot never matches, whatever its coordinates.
  padded = jit_match()(ANCHORS, GT, np.array([True, True, False]))
  np.testing.assert_array_equal(padded.to_torchvision(), [0, 0, -1, -1])


def test_empty_ground_truth_is_all_negative():
  r = jit_match()(ANCHORS, GT, np.zeros(3, bool))
  np.testing.assert_array_equal(r.state, [0, 0, 0, 0])
  r0 = jit_match()(ANCHORS, np.zeros((0, 4), np.float32), np.zeros(0, bool))
  np.testing.assert_array_equal(r0.state, [0, 0, 0, 0])
  only_crowd = jit_match()(ANCHORS, GT, MASK, gt_is_crowd=np.ones(3, bool))
  # A0 (IoU 1) and A2 (0.5) are near a crowd box; A1 (1/3 < 0.4) and A3 stay negative.
  np.testing.assert_array_equal(only_crowd.state, [-1, 0, -1, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_equals_torchvision(seed):
  rng = np.random.default_rng(seed)
  anchors = anchor_lib.generate_anchors((96, 128)).boxes
  num_valid, num_slots = 7, 12
  xy = rng.uniform(0, 100, (num_valid, 2))
  wh = rng.uniform(4, 60, (num_valid, 2))
  gt = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  gt[0] = anchors[500]  # an exact match, IoU 1
  gt[1] = np.round(gt[1])  # integer coordinates: exact ties among anchors
  # Valid boxes scattered among padded slots holding garbage.
  slots = np.sort(rng.choice(num_slots, num_valid, replace=False))
  padded = rng.uniform(0, 100, (num_slots, 4)).astype(np.float32)
  padded[slots] = gt
  mask = np.zeros(num_slots, bool)
  mask[slots] = True
  for mode, tv_low in (("ties", True), ("none", False)):
    r = jit_match(low_quality=mode)(anchors, padded, mask)
    ours = np.asarray(r.to_torchvision())
    ours = np.where(ours >= 0, np.searchsorted(slots, ours), ours)  # slot -> valid-box index
    np.testing.assert_array_equal(ours, torchvision_matches(anchors, gt, low_quality=tv_low))


def test_zero_area_box_quirk_matches_torchvision():
  anchors = anchor_lib.generate_anchors((64, 64)).boxes
  gt = np.array([[10, 10, 10, 30], [5, 5, 40, 40]], np.float32)  # first box has zero width
  r = jit_match()(anchors, gt, np.ones(2, bool))
  np.testing.assert_array_equal(r.to_torchvision(), torchvision_matches(anchors, gt))


def test_batched_vmap_equals_per_image():
  rng = np.random.default_rng(3)
  anchors = anchor_lib.generate_anchors((64, 64)).boxes
  xy = rng.uniform(0, 50, (2, 5, 2))
  gt = np.concatenate([xy, xy + rng.uniform(5, 30, (2, 5, 2))], -1).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  crowd = np.array([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
  batched = jax.jit(matching.batch_match_anchors)(anchors, gt, mask, gt_is_crowd=crowd)
  assert batched.state.shape == (2, anchors.shape[0])
  for i in range(2):
    single = matching.match_anchors(anchors, gt[i], mask[i], gt_is_crowd=crowd[i])
    np.testing.assert_array_equal(batched.state[i], single.state)
    np.testing.assert_array_equal(batched.gt_index[i], single.gt_index)


def test_classification_targets():
  r = jit_match()(ANCHORS, GT, MASK, gt_is_crowd=np.array([False, False, True]))
  labels = jax.jit(matching.classification_targets)(r, jnp.array([7, 3, 5]))
  np.testing.assert_array_equal(labels, [7, 7, -2, -1])


def test_bad_input_raises():
  with pytest.raises(ValueError, match="low_quality"):
    matching.match_anchors(ANCHORS, GT, MASK, low_quality="always")
  with pytest.raises(ValueError, match=r"gt_boxes must be \[M, 4\]"):
    matching.match_anchors(ANCHORS, GT[None], MASK)
  with pytest.raises(ValueError, match=r"gt_mask must be \[M\]"):
    matching.match_anchors(ANCHORS, GT, MASK[:2])
  with pytest.raises(ValueError, match="negative_threshold"):
    matching.match_anchors(ANCHORS, GT, MASK, negative_threshold=0.6)


def test_same_matches_under_shard_map_on_part_of_the_devices():
  # A program compiled for 2 of the 4 devices once disagreed on a tie with the plain one (two loops
  # computing one IoU with different FMA contraction); the single-loop design makes them agree.
  from jax.sharding import NamedSharding, PartitionSpec as P
  rng = np.random.default_rng(8)
  anchors = anchor_lib.generate_anchors((96, 128)).boxes
  xy = rng.uniform(0, 80, (4, 6, 2))
  gt = np.concatenate([xy, xy + rng.uniform(8, 60, (4, 6, 2))], -1).astype(np.float32)
  mask = rng.uniform(size=(4, 6)) < 0.8
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  f = lambda g, m: matching.batch_match_anchors(anchors, g, m)
  sharded = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"),) * 2, out_specs=P("data")))(
      *[jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (gt, mask)])
  plain = jax.jit(f)(gt, mask)
  np.testing.assert_array_equal(jax.device_get(sharded.state), plain.state)
  np.testing.assert_array_equal(jax.device_get(sharded.gt_index), plain.gt_index)


# --- Blocked matching: every block size gives the dense form's assignments, bit for bit. ---------

def _assert_same_match(a, b, context):
  for field in ("gt_index", "state", "max_iou"):
    np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)),
                                  err_msg=f"{field}, {context}")


@functools.lru_cache(maxsize=None)
def _cached_jit_match(mode, block):  # one compilation per mode and block size (and shapes)
  return jit_match(low_quality=mode, block_size=block)


def _blocked_vs_dense(anchors, gt, mask, crowd, block_sizes, modes=matching.LOW_QUALITY_MODES):
  for mode in modes:
    dense = _cached_jit_match(mode, gt.shape[0])(anchors, gt, mask, gt_is_crowd=crowd)
    for block in block_sizes:
      blocked = _cached_jit_match(mode, block)(anchors, gt, mask, gt_is_crowd=crowd)
      _assert_same_match(blocked, dense, f"mode {mode}, block {block}")
  return dense


def test_blocked_equals_dense_random_ties_and_padding():
  rng = np.random.default_rng(11)
  anchors = anchor_lib.generate_anchors((64, 64)).boxes  # 774 anchors
  # 40 slots: blocks of 7 (a partial last block) and 20 (auto) fold their rows one by one; the dense
  # form (one block of 40 > UNROLLED_BLOCK_SLOTS) reduces over the block: both folds meet. (Blocks
  # of 1: test_box_with_nan_coordinates_overlaps_nothing.)
  num_slots = 40
  assert matching.resolve_block_size(0, num_gt=num_slots) == 20
  assert num_slots > matching.UNROLLED_BLOCK_SLOTS >= 20
  xy = rng.uniform(0, 56, (num_slots, 2))
  gt = np.concatenate([xy, xy + rng.uniform(3, 40, (num_slots, 2))], 1).astype(np.float32)
  gt[3:9] = np.round(gt[3:9])  # integer coordinates: exact IoU ties among anchors
  gt[9] = gt[4]  # two slots with one box: ties across slots (and across blocks)
  gt[30] = gt[5]
  gt[10] = anchors[100]  # IoU exactly 1
  gt[11] = anchors[101]
  mask = rng.uniform(size=num_slots) < 0.8
  mask[[4, 5, 9, 10, 30]] = True
  # Padded slots hold garbage, NaN and infinities included: ignored whatever they hold.
  mask[[14, 15, 16, 33]] = False
  gt[14] = np.nan
  gt[15] = [np.inf, -np.inf, np.inf, np.nan]
  gt[16] = [-np.inf, -np.inf, np.inf, np.inf]
  gt[33, 2] = np.nan
  crowd = np.zeros(num_slots, bool)
  crowd[[2, 12, 25]] = True
  dense = _blocked_vs_dense(anchors, gt, mask, crowd, (7, 0))
  assert (np.asarray(dense.state) == matching.POSITIVE).sum() > 10  # a real test, not all negative
  assert (np.asarray(dense.state) == matching.IGNORE).sum() > 10
  # Both folds are torchvision's Matcher (no crowd boxes there), max IoUs bit for bit included.
  slots = np.nonzero(mask)[0]
  tv_iou = torchvision.ops.box_iou(torch.from_numpy(gt[mask]), torch.from_numpy(np.array(anchors)))
  for block in (7, num_slots):
    r = _cached_jit_match("ties", block)(anchors, gt, mask)
    ours = np.asarray(r.to_torchvision())
    ours = np.where(ours >= 0, np.searchsorted(slots, ours), ours)
    np.testing.assert_array_equal(ours, torchvision_matches(anchors, gt[mask]))
    np.testing.assert_array_equal(np.asarray(r.max_iou), tv_iou.max(dim=0).values.numpy())
  # All padding: all negative in every form.
  none = _blocked_vs_dense(anchors, gt, np.zeros(num_slots, bool), crowd, (7,), modes=("ties",))
  assert (np.asarray(none.state) == matching.NEGATIVE).all()


def test_box_with_nan_coordinates_overlaps_nothing():
  # A real box with a NaN coordinate has IoU 0 with every anchor (as [0, 0, 0, 0] has), in every
  # block form: the old guard's result (NaN > 0 is False), now made explicit before the IoU.
  anchors = anchor_lib.generate_anchors((64, 64)).boxes
  gt = np.array([[5, 5, 40, 40], [np.nan, 10, 30, 30], [20, 20, 60, 50]], np.float32)
  zeroed = gt.copy()
  zeroed[1] = 0.0
  mask = np.ones(3, bool)
  for block in (1, 3):
    got = _cached_jit_match("ties", block)(anchors, gt, mask)
    expected = _cached_jit_match("ties", block)(anchors, zeroed, mask)
    _assert_same_match(got, expected, f"block {block}")


def test_blocked_equals_dense_and_torchvision_at_3000_boxes():
  rng = np.random.default_rng(12)
  anchors = anchor_lib.generate_anchors((64, 64)).boxes
  num_slots = 3000
  xy = rng.uniform(0, 60, (num_slots, 2))
  gt = np.concatenate([xy, xy + rng.uniform(2, 24, (num_slots, 2))], 1).astype(np.float32)
  gt[::3] = np.round(gt[::3])
  mask = rng.uniform(size=num_slots) < 0.9
  # Auto: 177 blocks of 17 slots folded row by row; 64: reductions over partial and full blocks.
  _blocked_vs_dense(anchors, gt, mask, None, (0, 64), modes=("ties",))
  _blocked_vs_dense(anchors, gt, mask, None, (0,), modes=("force",))
  slots = np.nonzero(mask)[0]
  ours = np.asarray(_cached_jit_match("ties", 0)(anchors, gt, mask).to_torchvision())
  ours = np.where(ours >= 0, np.searchsorted(slots, ours), ours)
  np.testing.assert_array_equal(ours, torchvision_matches(anchors, gt[mask]))


def test_auto_block_size_bounds_memory():
  # Auto: num_gt // 16 blocks of equal size (16 to 31 slots), one block below 32 slots.
  for num_gt, block in ((1, 1), (10, 10), (31, 31), (32, 16), (100, 17), (300, 17), (2000, 16)):
    assert matching.resolve_block_size(0, num_gt=num_gt) == block, num_gt
  assert matching.resolve_block_size(16, num_gt=8) == 8
  assert matching.resolve_block_size(5, num_gt=100) == 5
  with pytest.raises(ValueError, match="block_size"):
    matching.resolve_block_size(-1, num_gt=10)
  # XLA's buffer assignment for 76,725 anchors x 2,000 boxes: a few [16, A] blocks (4.9 MB each),
  # far below the 614 MB [M, A] matrix.
  anchors = anchor_lib.generate_anchors((640, 640)).boxes
  gt = jax.ShapeDtypeStruct((2000, 4), jnp.float32)
  mask = jax.ShapeDtypeStruct((2000,), jnp.bool_)
  compiled = jit_match().lower(anchors, gt, mask).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 32 * 2**20
