"""losses.py against torchvision / torch and properties, all under jax.jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import torchvision
from jax.sharding import NamedSharding, PartitionSpec as P
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.retinanet import RetinaNetHead

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import labeling
from retinanet_jax import losses


def torch_focal(logits, targets, alpha, gamma, grad=False):
  x = torch.tensor(logits, dtype=torch.float64 if grad == "f64" else torch.float32, requires_grad=True)
  loss = torchvision.ops.sigmoid_focal_loss(x, torch.tensor(targets, dtype=x.dtype),
                                            alpha=-1 if alpha is None else alpha, gamma=gamma,
                                            reduction="none")
  loss.sum().backward()
  return loss.detach().numpy(), x.grad.numpy()


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 2.0), (0.25, 0.0), (0.5, 1.5), (0.75, 1.0)])
def test_focal_loss_matches_torchvision_values_and_grads(alpha, gamma):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 4, (64, 20)).astype(np.float32)
  logits[0, :4] = [100, -100, 30, -30]
  targets = (rng.uniform(size=(64, 20)) < 0.2).astype(np.float32)
  targets[0, :4] = [0, 1, 1, 0]
  fn = jax.jit(functools.partial(losses.sigmoid_focal_loss, alpha=alpha, gamma=gamma))
  ours = fn(logits, targets)
  grads = jax.jit(jax.grad(lambda x: fn(x, targets).sum()))(logits)
  ref, ref_grad = torch_focal(logits.astype(np.float64), targets, alpha, gamma, grad="f64")
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads, ref_grad, rtol=1e-4, atol=1e-6)


def test_focal_loss_soft_targets_match_torchvision():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (200,)).astype(np.float32)
  targets = rng.uniform(size=200).astype(np.float32)
  ours = jax.jit(losses.sigmoid_focal_loss)(logits, targets)
  ref, _ = torch_focal(logits.astype(np.float64), targets, 0.25, 2.0, grad="f64")
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_focal_loss_vmaps_and_differentiates_over_alpha_and_gamma():
  """Array hyper-parameters: `jax.vmap` over (alpha, gamma) equals torchvision at each pair, and
  d loss / d gamma equals the float64 closed form `loss * log(1 - p_t)`."""
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 4, (50,)).astype(np.float32)
  targets = (rng.uniform(size=50) < 0.3).astype(np.float32)
  alphas = np.array([0.25, 0.5, 0.75, 0.9], np.float32)
  gammas = np.array([0.0, 0.5, 2.0, 5.0], np.float32)
  fn = lambda a, g: losses.sigmoid_focal_loss(logits, targets, alpha=a, gamma=g)
  ours = jax.jit(jax.vmap(fn))(alphas, gammas)
  for i, (a, g) in enumerate(zip(alphas, gammas)):
    ref, _ = torch_focal(logits.astype(np.float64), targets, float(a), float(g), grad="f64")
    np.testing.assert_allclose(ours[i], ref, rtol=1e-5, atol=1e-6)
  d_gamma = jax.jit(jax.vmap(jax.grad(lambda g, i: fn(0.25, g)[i]), in_axes=(None, 0)))(
      np.float32(2.0), np.arange(50))
  x = logits.astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  p_t = np.where(targets == 1, p, 1 - p)
  alpha_t = np.where(targets == 1, 0.25, 0.75)
  ref = -alpha_t * (1 - p_t) ** 2 * np.log(p_t) * np.log(1 - p_t)
  np.testing.assert_allclose(d_gamma, ref, rtol=1e-4, atol=1e-7)


def test_gamma_zero_is_binary_cross_entropy():
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 5, (300,)).astype(np.float32)
  targets = (rng.uniform(size=300) < 0.5).astype(np.float32)
  ours = jax.jit(functools.partial(losses.sigmoid_focal_loss, alpha=None, gamma=0.0))(logits, targets)
  x = logits.astype(np.float64)
  bce = np.maximum(x, 0) - x * targets + np.log1p(np.exp(-np.abs(x)))  # float64 reference
  np.testing.assert_allclose(ours, bce, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ours, optax.sigmoid_binary_cross_entropy(logits, targets), rtol=1e-3,
                             atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_extreme_logits_finite_values_grads_hessians(gamma):
  x = jnp.array([100.0, -100.0, 100.0, -100.0, 0.0])
  t = jnp.array([1.0, 1.0, 0.0, 0.0, 1.0])
  f = lambda z: losses.sigmoid_focal_loss(z, t, gamma=gamma).sum()
  assert np.all(np.isfinite(jax.jit(lambda z: losses.sigmoid_focal_loss(z, t, gamma=gamma))(x)))
  assert np.all(np.isfinite(jax.jit(jax.grad(f))(x)))
  assert np.all(np.isfinite(jax.jit(jax.hessian(f))(x)))
  # The wrong side at 100 logits costs ~100 x alpha_t.
  np.testing.assert_allclose(losses.sigmoid_focal_loss(x, t, gamma=gamma)[1], 0.25 * 100, rtol=1e-5)
  labels = jnp.array([0, 1, -1, -2])
  g = lambda z: losses.sigmoid_focal_loss_from_labels(z, labels, gamma=gamma).sum()
  xs = jnp.array([[100.0, -100.0], [-100.0, 100.0], [100.0, -100.0], [-100.0, 100.0]])
  assert np.all(np.isfinite(jax.jit(jax.grad(g))(xs))) and np.all(np.isfinite(jax.jit(jax.hessian(g))(xs)))


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.4, 1.5)])
def test_label_form_equals_dense_form(alpha, gamma):
  rng = np.random.default_rng(3)
  logits = rng.normal(-2, 4, (2, 50, 7)).astype(np.float32)
  labels = rng.integers(-2, 7, (2, 50)).astype(np.int32)  # -2 ignore, -1 background, 0..6 classes
  one_hot = (labels[..., None] == np.arange(7)).astype(np.float32)

  def dense(x):
    per = losses.sigmoid_focal_loss(x, one_hot, alpha=alpha, gamma=gamma).sum(-1)
    return jnp.where(labels == -2, 0.0, per)

  def sparse(x):
    return losses.sigmoid_focal_loss_from_labels(x, labels, alpha=alpha, gamma=gamma)

  np.testing.assert_allclose(jax.jit(sparse)(logits), jax.jit(dense)(logits), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(lambda x: sparse(x).sum()))(logits),
                             jax.jit(jax.grad(lambda x: dense(x).sum()))(logits), rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(jax.jit(sparse)(logits))[labels == -2] == 0)


@pytest.mark.parametrize("num_classes", [1, 80, 91, 131])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.4, 1.5)])
def test_label_form_matches_torchvision_for_every_class_grouping(num_classes, alpha, gamma):
  # K=80: 10 groups of 8 summed in the fused loop; 91: 13 groups of 7; 131 (prime): ungrouped; 1: one.
  rng = np.random.default_rng(num_classes)
  logits = rng.normal(-3, 4, (3, 40, num_classes)).astype(np.float32)
  logits[0, 0, 0], logits[0, 1, -1] = 100.0, -100.0
  labels = rng.integers(-2, num_classes, (3, 40)).astype(np.int32)
  labels[0, :2] = [-1, num_classes - 1]
  one_hot = (labels[..., None] == np.arange(num_classes)).astype(np.float64)
  ref, ref_grad = torch_focal(logits.astype(np.float64), one_hot, alpha, gamma, grad="f64")
  ignored = labels < -1
  ref = np.where(ignored, 0.0, ref.sum(-1))
  ref_grad = np.where(ignored[..., None], 0.0, ref_grad)
  fn = jax.jit(functools.partial(losses.sigmoid_focal_loss_from_labels, alpha=alpha, gamma=gamma))
  np.testing.assert_allclose(fn(logits, labels), ref, rtol=2e-6, atol=1e-6)
  grads = jax.jit(jax.grad(lambda x: fn(x, labels).sum()))(logits)
  np.testing.assert_allclose(grads, ref_grad, rtol=1e-5, atol=1e-7)


def test_label_form_forward_mode_equals_dense_form():
  rng = np.random.default_rng(5)
  logits = rng.normal(-2, 3, (4, 30, 16)).astype(np.float32)
  labels = rng.integers(-2, 16, (4, 30)).astype(np.int32)
  direction = rng.normal(size=logits.shape).astype(np.float32)
  one_hot = (labels[..., None] == np.arange(16)).astype(np.float32)
  sparse = lambda x: losses.sigmoid_focal_loss_from_labels(x, labels)
  dense = lambda x: jnp.where(labels == -2, 0.0, losses.sigmoid_focal_loss(x, one_hot).sum(-1))
  out, tangent = jax.jit(lambda x, d: jax.jvp(sparse, (x,), (d,)))(logits, direction)
  ref_out, ref_tangent = jax.jit(lambda x, d: jax.jvp(dense, (x,), (d,)))(logits, direction)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tangent, ref_tangent, rtol=1e-4, atol=1e-5)


def test_box_losses_match_torch():
  rng = np.random.default_rng(4)
  p, t = rng.normal(0, 1, (2, 100, 4)).astype(np.float32), rng.normal(0, 1, (2, 100, 4)).astype(np.float32)
  tp, tt = torch.from_numpy(p), torch.from_numpy(t)
  np.testing.assert_allclose(jax.jit(losses.l1_loss)(p, t), F.l1_loss(tp, tt, reduction="none"), rtol=1e-6)
  for beta in (0.0, 0.1, 1.0):
    np.testing.assert_allclose(jax.jit(functools.partial(losses.smooth_l1_loss, beta=beta))(p, t),
                               F.smooth_l1_loss(tp, tt, reduction="none", beta=beta), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.jit(functools.partial(losses.huber_loss, delta=0.1))(p, t),
                             F.huber_loss(tp, tt, reduction="none", delta=0.1), rtol=1e-5, atol=1e-7)
  xy = rng.uniform(0, 50, (100, 2))
  b1 = np.concatenate([xy, xy + rng.uniform(1, 30, (100, 2))], 1).astype(np.float32)
  b2 = b1 + rng.normal(0, 5, (100, 4)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(losses.giou_loss)(b1, b2),
                             torchvision.ops.generalized_box_iou_loss(torch.from_numpy(b1),
                                                                      torch.from_numpy(b2)),
                             rtol=1e-5, atol=1e-6)


def make_problem(seed, batch=2, num_classes=5, image=(96, 128), slots=6):
  rng = np.random.default_rng(seed)
  anchors = anchor_lib.generate_anchors(image).boxes
  a = anchors.shape[0]
  logits = rng.normal(-3, 2, (batch, a, num_classes)).astype(np.float32)
  deltas = rng.normal(0, 0.3, (batch, a, 4)).astype(np.float32)
  xy = rng.uniform(0, 80, (batch, slots, 2))
  gt = np.concatenate([xy, xy + rng.uniform(8, 60, (batch, slots, 2))], -1).astype(np.float32)
  labels = rng.integers(0, num_classes, (batch, slots)).astype(np.int32)
  mask = np.zeros((batch, slots), bool)
  mask[0, :4] = True
  mask[1, :2] = True
  return anchors, logits, deltas, gt, labels, mask


def torchvision_loss_sums(anchors, logits, deltas, gt, labels, mask, loss_type):
  """Per-image (cls sum, box sum, positives) from torchvision's RetinaNetHead.compute_loss."""
  num_classes = logits.shape[-1]
  head = RetinaNetHead(8, 9, num_classes)
  head.regression_head._loss_type = loss_type
  matcher = tv_det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
  out = []
  for i in range(logits.shape[0]):
    g = torch.from_numpy(gt[i][mask[i]])
    target = {"boxes": g, "labels": torch.from_numpy(labels[i][mask[i]]).long()}
    anc = torch.from_numpy(np.array(anchors))
    matched = matcher(torchvision.ops.box_iou(g, anc))
    n = int((matched >= 0).sum())
    res = head.compute_loss([target], {"cls_logits": torch.from_numpy(logits[i:i + 1]),
                                       "bbox_regression": torch.from_numpy(deltas[i:i + 1])},
                            [anc], [matched])
    out.append((res["classification"].item() * max(1, n), res["bbox_regression"].item() * max(1, n), n))
  return np.array(out, np.float64)


def targets_of(anchors, gt, labels, mask, crowd=None):
  return labeling.label_anchors(anchors, gt, labels, mask, gt_is_crowd=crowd)


@pytest.mark.parametrize("box_loss", ["l1", "giou"])
def test_retinanet_loss_matches_torchvision(box_loss):
  anchors, logits, deltas, gt, labels, mask = make_problem(5)
  fn = jax.jit(lambda x, d, g, l, m: losses.retinanet_loss(
      x, d, targets_of(anchors, g, l, m), anchors=anchors, box_loss=box_loss))
  out = fn(logits, deltas, gt, labels, mask)
  sums = torchvision_loss_sums(anchors, logits, deltas, gt, labels, mask, box_loss)
  total_pos = sums[:, 2].sum()
  assert float(out.num_positives) == total_pos > 0
  # Batch normalization: batch sums over batch positives (torchvision normalizes each image).
  np.testing.assert_allclose(out.cls_loss, sums[:, 0].sum() / total_pos, rtol=1e-5)
  np.testing.assert_allclose(out.box_loss, sums[:, 1].sum() / total_pos, rtol=1e-5)
  np.testing.assert_allclose(out.loss, out.cls_loss + out.box_loss, rtol=1e-6)
  # One image: exactly torchvision's loss.
  single = fn(logits[:1], deltas[:1], gt[:1], labels[:1], mask[:1])
  np.testing.assert_allclose([single.cls_loss, single.box_loss], sums[0, :2] / sums[0, 2], rtol=1e-5)
  # The unnormalized sums are torchvision's per-image sums added up.
  raw = jax.jit(lambda x, d, g, l, m: losses.retinanet_losses(
      x, d, targets_of(anchors, g, l, m), anchors=anchors, box_loss=box_loss))(
          logits, deltas, gt, labels, mask)
  np.testing.assert_allclose([raw.cls, raw.box], sums[:, :2].sum(0), rtol=1e-5)


def test_label_anchors_golden():
  """Two anchors, one box: the first is a positive of its class with the box as target, the
  second (IoU 0) background with the unit box."""
  anchors = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
  gt = np.array([[[0, 0, 10, 10], [0, 0, 1, 1]]], np.float32)
  out = jax.jit(labeling.label_anchors)(anchors, gt, np.array([[3, 1]], np.int32),
                                        np.array([[True, False]]))
  np.testing.assert_array_equal(out.labels, [[3, labeling.BACKGROUND]])
  np.testing.assert_array_equal(out.positive, [[True, False]])
  np.testing.assert_array_equal(out.matched_boxes, [[[0, 0, 10, 10], labeling.UNIT_BOX]])
  assert float(out.num_positives) == 1.0


def test_retinanet_loss_edge_cases_are_finite():
  anchors, logits, deltas, gt, labels, mask = make_problem(6)
  fn = jax.jit(lambda x, d, m: losses.retinanet_loss(x, d, targets_of(anchors, gt, labels, m),
                                                      anchors=anchors))
  grad = jax.jit(jax.grad(lambda x, d, m, c, g: losses.retinanet_loss(
      x, d, targets_of(anchors, g, labels, m, c), anchors=anchors).loss, argnums=(0, 1)))
  empty = np.zeros_like(mask)
  out = fn(logits, deltas, empty)
  assert float(out.box_loss) == 0.0 and float(out.num_positives) == 0 and np.isfinite(out.cls_loss)
  crowd = mask.copy()
  zero_area = gt.copy()
  zero_area[:, :, 2] = zero_area[:, :, 0]  # every box zero-width
  for m, c, g in ((empty, empty, gt), (mask, crowd, gt), (mask, empty, zero_area)):
    for x in grad(logits, deltas, m, c, g):
      assert np.all(np.isfinite(x))


def test_bad_input_raises():
  anchors, logits, deltas, gt, labels, mask = make_problem(9)
  targets = targets_of(anchors, gt, labels, mask)
  with pytest.raises(ValueError, match="box_loss"):
    losses.retinanet_loss(logits, deltas, targets, anchors=anchors, box_loss="l2")
  with pytest.raises(ValueError, match=r"box_deltas must be \[B, A, 4\]"):
    losses.retinanet_loss(logits, deltas[:, :10], targets, anchors=anchors)
  with pytest.raises(ValueError, match=r"gt_boxes must be \[B, M, 4\]"):
    labeling.label_anchors(anchors, gt[0], labels, mask)
  with pytest.raises(ValueError, match="alpha"):
    losses.sigmoid_focal_loss(logits, logits, alpha=1.5)
  with pytest.raises(ValueError, match="same shape|one shape"):
    losses.sigmoid_focal_loss(logits, logits[0])
