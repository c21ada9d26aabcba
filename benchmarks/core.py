"""The core suite: focal loss, anchor matching and post-processing against torchvision's."""

from __future__ import annotations

import functools

from benchmarks.timing import Row, Session, block, side_by_side


def bench_focal_loss(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torchvision

  from retinanet_jax import losses

  shape = (2, 2000, 80) if quick else (8, 76725, 80)
  rng = np.random.default_rng(0)
  logits = rng.normal(-4, 2, shape).astype(np.float32)
  labels = rng.integers(-2, shape[-1], shape[:2]).astype(np.int32)
  labels[rng.uniform(size=shape[:2]) < 0.9] = -1  # mostly background, as in real batches
  one_hot = (labels[..., None] == np.arange(shape[-1])).astype(np.float32)
  valid = (labels != -2).astype(np.float32)[..., None]

  x_dev, l_dev = jnp.asarray(logits), jnp.asarray(labels)
  ours_fn = jax.jit(jax.value_and_grad(
      lambda x, l: losses.sigmoid_focal_loss_from_labels(x, l).sum()))
  xt = torch.from_numpy(logits).requires_grad_(True)
  tt, vt = torch.from_numpy(one_hot), torch.from_numpy(valid)

  def peer_step():
    xt.grad = None
    loss = (torchvision.ops.sigmoid_focal_loss(xt, tt, reduction="none") * vt).sum()
    loss.backward()
    return loss

  ours, peer = side_by_side(lambda: block(ours_fn(x_dev, l_dev)), peer_step, repeats)
  copy = jax.jit(lambda x: x * 1.0000001)
  big = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  copy_s = side_by_side(lambda: block(copy(big)), lambda: None, repeats)[0].wall
  # fwd+bwd reads logits (+labels) and writes the gradient: 2 x logits bytes at least.
  ours_bw, copy_bw = 2 * logits.nbytes / ours.wall / 1e9, 2 * logits.nbytes / copy_s / 1e9
  return [Row("core", f"focal loss fwd+bwd {list(shape)} (ours: integer labels; torchvision: dense "
              "one-hot)", ours, peer, 0.0, f"{ours_bw:.1f} GB/s vs copy {copy_bw:.1f} GB/s")]


def bench_matching(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  import jax
  import numpy as np
  import torch
  import torchvision
  from torchvision.models.detection import _utils as tv_det_utils

  from retinanet_jax import anchors as anchor_lib
  from retinanet_jax import matching

  batch, size, slots = (2, (128, 128), 20) if quick else (8, (640, 640), 100)
  anchors = anchor_lib.generate_anchors(size).boxes
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, size[0] * 0.8, (batch, slots, 2))
  gt = np.concatenate([xy, xy + rng.uniform(8, size[0] * 0.4, (batch, slots, 2))], -1).astype(np.float32)
  mask = np.ones((batch, slots), bool)
  fn = jax.jit(matching.batch_match_anchors)
  matcher = tv_det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
  anc_t = torch.from_numpy(np.array(anchors))
  gts = [torch.from_numpy(g) for g in gt]
  ours, peer = side_by_side(lambda: block(fn(anchors, gt, mask)),
                            lambda: [matcher(torchvision.ops.box_iou(g, anc_t)) for g in gts], repeats)
  return [Row("core", f"matching {batch} images x {anchors.shape[0]} anchors x {slots} boxes", ours,
              peer)]


def torchvision_postprocess(logits, deltas, anchor_set, image_hw, **overrides):
  """torchvision's `RetinaNet.postprocess_detections` (per level top-k, then batched NMS) on NumPy
  head outputs `[B, A, K]`, `[B, A, 4]` in our anchor order, with its defaults (score 0.05, 1000
  candidates per level, NMS 0.5, 100 detections) unless `overrides` says otherwise: a list of dicts
  of boxes, scores, labels per image. The peer of the post-processing row, and the reference of
  tests/test_postprocess.py."""
  import types

  import numpy as np
  import torch
  from torchvision.models.detection import _utils as tv_det_utils
  from torchvision.models.detection.retinanet import RetinaNet

  fake = types.SimpleNamespace(score_thresh=0.05, topk_candidates=1000, nms_thresh=0.5,
                               detections_per_img=100,
                               box_coder=tv_det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)))
  vars(fake).update(overrides)
  counts = list(anchor_set.level_counts)
  head = {"cls_logits": list(torch.from_numpy(logits).split(counts, dim=1)),
          "bbox_regression": list(torch.from_numpy(deltas).split(counts, dim=1))}
  anchors = torch.from_numpy(np.array(anchor_set.boxes))
  per_image = [list(anchors.split(counts)) for _ in range(logits.shape[0])]
  return RetinaNet.postprocess_detections(fake, head, per_image, [tuple(hw) for hw in image_hw])


def bench_postprocess(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  import jax
  import numpy as np

  from retinanet_jax import anchors as anchor_lib
  from retinanet_jax import postprocess

  batch, size, classes = (2, (128, 128), 5) if quick else (8, (640, 640), 80)
  anchor_set = anchor_lib.generate_anchors(size)
  rng = np.random.default_rng(2)
  logits = rng.normal(-6, 1.5, (batch, anchor_set.num_anchors, classes)).astype(np.float32)
  deltas = rng.normal(0, 0.3, (batch, anchor_set.num_anchors, 4)).astype(np.float32)
  hw = np.tile(np.array([size], np.int32), (batch, 1))
  fn = jax.jit(functools.partial(postprocess.postprocess_detections, anchors=anchor_set))
  # On the device once, as head outputs are (torch.from_numpy gives the peer the same, without a copy).
  logits_dev, deltas_dev, hw_dev = jax.device_put((logits, deltas, hw))
  ours, peer = side_by_side(lambda: block(fn(logits_dev, deltas_dev, image_hw=hw_dev)),
                            lambda: torchvision_postprocess(logits, deltas, anchor_set, hw), repeats)
  return [Row("core", f"post-processing {batch} images {size[0]}x{size[1]}, {classes} classes", ours,
              peer)]
