"""The dense suite: what thousands of boxes per image cost (issue 12), against torchvision.

  * matching one image to M boxes: 76,725 anchors (640x640) with M = 100, 300, 500 and 2,000, and
    201,600 anchors (the 800x1344 canvas of 800/1333) with M = 100 and 300: ours (blocked IoU,
    `runtime.matching_block_size` auto) against torchvision's `box_iou` + `Matcher` (allow low
    quality matches), time and peak memory. Peak memory: the growth of this process's peak resident
    set while one call runs (Linux `/proc/self/status` VmHWM, reset through `/proc/self/clear_refs`
    before each call), the same measure for both; ours also gives XLA's own buffer assignment (temp
    bytes of the compiled program) and that of the dense form (`block_size=M`);
  * NMS of 5,000 candidates (2 classes) for D = 100, 300 and 1,000 kept boxes: ours tiled (the
    default) against torchvision's `batched_nms` then `[:D]`; the note has our rounds NMS (the
    previous form) too;
  * the training step (R50-FPN, 640x640, batch 1) with 1,000 boxes per image against the same step
    with 100 boxes (issue 12's target: at most 1.3x), ours and torchvision's, all on the same image.
"""

from __future__ import annotations

import functools

from benchmarks import networks
from benchmarks.networks import FULL_NET, TINY_NET
from benchmarks.timing import Row, Session, block, side_by_side


def _peak_rss_growth(fn) -> float:
  """Bytes by which the peak resident set grows while `fn()` runs (0 where /proc is missing)."""
  def read(key):
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(key):
          return int(line.split()[1]) * 1024
    return 0
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current resident set
  except OSError:
    return 0.0
  before = read("VmRSS:")
  fn()
  return float(read("VmHWM:") - before)


def _boxes(rng, count: int, size: int, lo: float, hi: float):
  import numpy as np
  xy = rng.uniform(0, size - hi, (count, 2))
  return np.concatenate([xy, xy + rng.uniform(lo, hi, (count, 2))], -1).astype(np.float32)


def bench_dense_matching(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  import jax
  import numpy as np
  import torch
  import torchvision
  from torchvision.models.detection import _utils as tv_det_utils

  from retinanet_jax import anchors as anchor_lib
  from retinanet_jax import matching

  if quick:
    cases = [((128, 128), 10), ((128, 128), 50)]
  else:
    cases = [((640, 640), m) for m in (100, 300, 500, 2000)] + [((800, 1344), m) for m in (100, 300)]
  matcher = tv_det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
  rng = np.random.default_rng(5)
  rows = []
  for (height, width), m in cases:
    anchors = anchor_lib.generate_anchors((height, width)).boxes
    anchors_t = torch.from_numpy(np.array(anchors))
    gt = _boxes(rng, m, height, 8, height / 8)
    gt[:, 0::2] *= width / height  # spread over the canvas's width too (square canvases: unchanged)
    mask = np.ones(m, bool)
    gt_t = torch.from_numpy(gt)
    ours_fn = jax.jit(matching.match_anchors)
    dense_fn = jax.jit(functools.partial(matching.match_anchors, block_size=m))
    ours_temp = ours_fn.lower(anchors, gt, mask).compile().memory_analysis().temp_size_in_bytes
    dense_temp = dense_fn.lower(anchors, gt, mask).compile().memory_analysis().temp_size_in_bytes
    ours = lambda: block(ours_fn(anchors, gt, mask))
    peer = lambda: matcher(torchvision.ops.box_iou(gt_t, anchors_t))
    ours(), peer()
    ours_rss, peer_rss = _peak_rss_growth(ours), _peak_rss_growth(peer)
    ours_t, peer_t = side_by_side(ours, peer, repeats, warmup=False)
    block_size = matching.resolve_block_size(0, num_gt=m)
    rows.append(Row(
        "dense", f"matching 1 image x {anchors.shape[0]} anchors ({height}x{width}) x {m} boxes",
        ours_t, peer_t, 0.0,
        f"peak RSS growth ours {ours_rss / 2**20:.0f} MiB vs {peer_rss / 2**20:.0f} MiB; XLA temp "
        f"{ours_temp / 2**20:.0f} MiB (blocks of {block_size}), dense form {dense_temp / 2**20:.0f} MiB"))
  return rows


def bench_dense_nms(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  import jax
  import numpy as np
  import torch
  import torchvision

  from retinanet_jax import postprocess

  n, detections = (500, (10, 100)) if quick else (5000, (100, 300, 1000))
  rng = np.random.default_rng(6)
  boxes = _boxes(rng, n, 640, 8, 80)
  scores = rng.uniform(size=n).astype(np.float32)
  classes = rng.integers(0, 2, n).astype(np.int32)
  boxes_t, scores_t, classes_t = (torch.from_numpy(x) for x in (boxes, scores, classes))
  rows = []
  for d in detections:
    fns = {mode: jax.jit(functools.partial(fn, iou_threshold=0.5, max_detections=d))
           for mode, fn in (("tiled", postprocess.tiled_class_wise_nms),
                            ("rounds", postprocess.class_wise_nms))}
    tiled = lambda: block(fns["tiled"](boxes, scores, classes))
    rounds = lambda: block(fns["rounds"](boxes, scores, classes))
    peer = lambda: torchvision.ops.batched_nms(boxes_t, scores_t, classes_t, 0.5)[:d]
    ours_t, peer_t = side_by_side(tiled, peer, repeats)
    rounds_t, _ = side_by_side(rounds, lambda: None, repeats)
    kept = int(np.asarray(fns["tiled"](boxes, scores, classes)[1]).sum())
    rows.append(Row("dense", f"NMS {n} candidates, 2 classes, D = {d} (ours: tiled)", ours_t,
                    peer_t, 0.0, f"{kept} kept; rounds NMS {rounds_t.wall * 1e3:.1f} ms "
                    f"({rounds_t.wall / ours_t.wall:.1f}x tiled)"))
  return rows


def bench_dense_training(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  import numpy as np

  spec = TINY_NET if quick else FULL_NET
  size, counts = (96, (10, 100)) if quick else (640, (100, 1000))
  torch_model = networks.torchvision_retinanet(spec)
  state_dict = networks.converted_state(torch_model, spec)
  rng = np.random.default_rng(7)
  image = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
  steps, peers = {}, {}
  for m in counts:
    boxes = _boxes(rng, m, size, size / 40, size / 13)[None]
    labels = rng.integers(1, spec.num_classes, (1, m)).astype(np.int32)
    compiled, state, device_batch, host_batch, _ = networks.our_training(
        spec, size, 1, state_dict=state_dict, targets=(boxes, labels))
    holder = [state]

    def ours(compiled=compiled, holder=holder, device_batch=device_batch):
      holder[0], metrics = compiled(holder[0], device_batch)
      return block(metrics["loss"])
    host_batch = {**host_batch, "image": image}
    steps[m], peers[m] = ours, networks.torchvision_training(torch_model, host_batch)
  few, many = counts
  many_t, few_t = side_by_side(steps[many], steps[few], repeats)
  peer_many_t, peer_few_t = side_by_side(peers[many], peers[few], repeats)
  rows = []
  for m, ours_t, peer_t in ((few, few_t, peer_few_t), (many, many_t, peer_many_t)):
    note = ""
    if m == many:
      note = (f"ours {many} / {few} boxes: {many_t.wall / few_t.wall:.2f}x (target <= 1.3x); "
              f"torchvision {peer_many_t.wall / peer_few_t.wall:.2f}x")
    rows.append(Row("dense", f"training step {size}x{size} batch 1, {m} boxes per image", ours_t,
                    peer_t, 0.0, note))
  return rows
