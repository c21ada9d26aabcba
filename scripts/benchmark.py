"""Benchmarks of retinanet_jax against torchvision, measured side by side in one run.

    python scripts/benchmark.py --suite=all --write --profile  # every suite; table into docs/benchmarks.md
    python scripts/benchmark.py --suite=train                  # one suite: core, model, train, input
    python scripts/benchmark.py --suite=accelerator --write    # on a GPU/TPU host: bfloat16 rows
    python scripts/benchmark.py --suite=all --quick            # smoke test: tiny shapes, 1 repeat, -O0
    python scripts/benchmark.py --suite=train --xla_flags=     # XLA's own defaults instead of ours

Suites (the peer is torchvision on the same machine, in the same process, on the same inputs):
  core   focal loss, anchor matching, post-processing.
  model  inference (normalization, R50-FPN network, post-processing; jitted, batch 1) at 512x512 and
         800x1333 vs torchvision's RetinaNet in eval mode on the same converted random weights, its
         resize disabled (the input is already at network size); plus the time to the first result.
  train  one training step (normalization, network, matching, loss, backward, SGD) R50-FPN 512x512
         batch 2 vs torchvision's model in train mode (forward, backward, SGD step); the time to the
         first step; and, in fresh processes, the first step at 640x640 with JAX's persistent
         compilation cache empty, then filled by the first process.
  input  the training input pipeline (retinanet_jax/data/benchmark.py) at 640 LSJ and 800/1333 vs
         torchvision's detection-reference transforms (transforms.v2) on the same JPEGs, per core.
  accelerator  bfloat16 on the device JAX runs on (a GPU or TPU; 'all' includes it there), with
         torchvision in bfloat16 autocast (AMP) on the same GPU (torch's CPU elsewhere): training
         R50-FPN at 640x640 and 1024x1024 at the largest batch that fits, as time per image, with the
         model FLOP utilization against the device's bfloat16 peak; inference at 800x1333 with NMS,
         batch 1 latency and batch 32 throughput.

Every row times ours and the peer alternately (ours, peer, peer, ours, ...) and reports medians of
the wall-clock time and of this process's CPU time, and the ratios peer / ours (> 1: we are faster).
FLOP/s use XLA's FLOP count of our compiled program for both (the same network does the same work),
set against the float32 matrix-multiply rate measured in the same run ('machine' row). Machines are
shared and noisy: compare ratios of one run, not absolute times across runs; the CPU-time ratio is the
one that survives a busy machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable
from unittest import mock

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from retinanet_jax import xla_flags  # noqa: E402  (imports no JAX)

FLAGS = flags.FLAGS
SUITES = ("core", "model", "train", "input", "accelerator", "all")
flags.DEFINE_enum("suite", "core", SUITES, "Which cases to run.")
flags.DEFINE_bool("quick", False, "Tiny shapes and one repeat: checks that the script runs.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per case and side (after one warm-up).")
flags.DEFINE_bool("write", False, "Write the table (and profiles) into docs/benchmarks.md.")
flags.DEFINE_bool("profile", False, "Also profile our training step and inference per XLA operation, "
                  "and torchvision's per ATen operator.")
flags.DEFINE_string("xla_flags", None, "XLA flags added to $XLA_FLAGS; default: "
                    "retinanet_jax.xla_flags.CPU_FLAGS (--quick: QUICK_XLA_FLAGS). Pass an empty "
                    "value for XLA's defaults.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: torch's default).")
flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "retinanet_jax_benchmark"),
                    "Where the input suite builds its stand-in JPEG dataset (once).")
flags.DEFINE_float("input_seconds", 10.0, "Seconds per input-pipeline measurement.")
flags.DEFINE_bool("compile_cache_rows", True, "train suite: also measure the first step in new "
                  "processes with the persistent compilation cache (two extra processes).")
flags.DEFINE_string("accelerator_sizes", "640,1024", "accelerator suite: training image sizes.")
flags.DEFINE_string("accelerator_batches", "8,16,32,64,128,256", "accelerator suite: training batch "
                    "sizes tried in order; the largest that fits in device memory is measured.")
flags.DEFINE_float("peak_tflops", 0.0, "accelerator suite: the device's dense bfloat16 peak in TFLOP/s "
                   "for the model FLOP utilization (0: looked up from the device kind).")
flags.DEFINE_string("compile_cache_child", None, "Internal: run the compile-cache measurement in this "
                    "process with this cache directory and print its result.")

QUICK_XLA_FLAGS = ("--xla_backend_optimization_level=0",)  # LLVM -O0, XLA's own convolutions
MATMUL_FLOPS_PER_SECOND = [0.0]  # ours, measured by the 'machine' row of this run
PROFILES: list[str] = []
LOAD_AT_START = ["?"]


# ----------------------------------------------------------------------------------------------
# Timing and rows
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
  wall: float
  cpu: float


@dataclasses.dataclass
class Row:
  suite: str
  case: str
  ours: Timing
  peer: Timing
  flops: float = 0.0  # per call, XLA's count for our program (the same work for both)
  note: str = ""

  @property
  def ratio(self) -> float:
    return self.peer.wall / self.ours.wall

  @property
  def cpu_ratio(self) -> float:
    return self.peer.cpu / self.ours.cpu if self.ours.cpu > 0 else float("nan")


def _timed(fn: Callable[[], object]) -> Timing:
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def side_by_side(ours: Callable[[], object], peer: Callable[[], object], repeats: int,
                 *, warmup: bool = True) -> tuple[Timing, Timing]:
  """Median wall and CPU times of `ours` and `peer`, run alternately (ABBA order) after a warm-up."""
  if warmup:
    ours()
    peer()
  times = {0: [], 1: []}
  for i in range(repeats):
    order = (0, 1) if i % 2 == 0 else (1, 0)
    for side in order:
      times[side].append(_timed(ours if side == 0 else peer))
  med = lambda ts: Timing(statistics.median(t.wall for t in ts), statistics.median(t.cpu for t in ts))
  return med(times[0]), med(times[1])


def _block(x):
  import jax
  return jax.block_until_ready(x)


def _flops_rate(row: Row) -> tuple[float, float]:
  return (row.flops / row.ours.wall, row.flops / row.peer.wall) if row.flops else (0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Machine: the float32 matrix-multiply rate every FLOP/s is compared with
# ----------------------------------------------------------------------------------------------


def _matmul_case(quick: bool):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from retinanet_jax import profiling

  n = 512 if quick else 2048
  a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
  compiled = jax.jit(jnp.dot).lower(a, a).compile()
  flops = profiling.compiled_flops(compiled) or 2.0 * n ** 3
  a_dev = jnp.asarray(a)
  return n, a, flops, lambda: _block(compiled(a_dev, a_dev))


def update_matmul_rate(quick: bool, repeats: int) -> None:
  """The machine's rate: the best of `repeats` float32 matmuls (kept if better than before)."""
  _, _, flops, ours = _matmul_case(quick)
  ours()
  best = min(_timed(ours).wall for _ in range(repeats))
  MATMUL_FLOPS_PER_SECOND[0] = max(MATMUL_FLOPS_PER_SECOND[0], flops / best)


def bench_machine(quick: bool, repeats: int) -> list[Row]:
  import torch

  n, a, flops, ours_fn = _matmul_case(quick)
  a_t = torch.from_numpy(a.copy())
  ours, peer = side_by_side(ours_fn, lambda: torch.mm(a_t, a_t), repeats)
  update_matmul_rate(quick, repeats)
  return [Row("machine", f"float32 matmul {n}x{n}x{n} (jnp.dot vs torch.mm)", ours, peer, flops,
              "the % column's reference: our best matmul rate at the start or end of the run")]


# ----------------------------------------------------------------------------------------------
# core: focal loss, matching, post-processing
# ----------------------------------------------------------------------------------------------


def bench_focal_loss(quick: bool, repeats: int) -> list[Row]:
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

  ours, peer = side_by_side(lambda: _block(ours_fn(x_dev, l_dev)), peer_step, repeats)
  copy = jax.jit(lambda x: x * 1.0000001)
  big = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  copy_s = side_by_side(lambda: _block(copy(big)), lambda: None, repeats)[0].wall
  # fwd+bwd reads logits (+labels) and writes the gradient: 2 x logits bytes at least.
  ours_bw, copy_bw = 2 * logits.nbytes / ours.wall / 1e9, 2 * logits.nbytes / copy_s / 1e9
  return [Row("core", f"focal loss fwd+bwd {list(shape)} (ours: integer labels; torchvision: dense "
              "one-hot)", ours, peer, 0.0, f"{ours_bw:.1f} GB/s vs copy {copy_bw:.1f} GB/s")]


def bench_matching(quick: bool, repeats: int) -> list[Row]:
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
  ours, peer = side_by_side(lambda: _block(fn(anchors, gt, mask)),
                            lambda: [matcher(torchvision.ops.box_iou(g, anc_t)) for g in gts], repeats)
  return [Row("core", f"matching {batch} images x {anchors.shape[0]} anchors x {slots} boxes", ours,
              peer)]


def bench_postprocess(quick: bool, repeats: int) -> list[Row]:
  import jax
  import numpy as np

  from retinanet_jax import anchors as anchor_lib
  from retinanet_jax import postprocess
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from test_postprocess import torchvision_postprocess  # the reference call, shared with the tests

  batch, size, classes = (2, (128, 128), 5) if quick else (8, (640, 640), 80)
  anchor_set = anchor_lib.generate_anchors(size)
  rng = np.random.default_rng(2)
  logits = rng.normal(-6, 1.5, (batch, anchor_set.num_anchors, classes)).astype(np.float32)
  deltas = rng.normal(0, 0.3, (batch, anchor_set.num_anchors, 4)).astype(np.float32)
  hw = np.tile(np.array([size], np.int32), (batch, 1))
  fn = jax.jit(functools.partial(postprocess.postprocess_detections, anchors=anchor_set))
  # On the device once, as head outputs are (torch.from_numpy gives the peer the same, without a copy).
  logits_dev, deltas_dev, hw_dev = jax.device_put((logits, deltas, hw))
  ours, peer = side_by_side(lambda: _block(fn(logits_dev, deltas_dev, image_hw=hw_dev)),
                            lambda: torchvision_postprocess(logits, deltas, anchor_set, hw), repeats)
  return [Row("core", f"post-processing {batch} images {size[0]}x{size[1]}, {classes} classes", ours,
              peer)]


# ----------------------------------------------------------------------------------------------
# The two networks, with the same weights
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """A RetinaNet both libraries can build: torchvision's v1 layout (P6 from P5) with frozen BN."""

  backbone: str
  channels: int
  num_classes: int

  def our_fields(self) -> dict:
    from retinanet_jax import weights
    return {**weights.source_defaults("torchvision_v1")["model"], "norm_epsilon": 1e-5,
            "backbone": self.backbone, "fpn_channels": self.channels,
            "num_classes": self.num_classes}


FULL_NET = NetSpec("resnet50", 256, 91)  # torchvision's retinanet_resnet50_fpn (COCO, 91 classes)
TINY_NET = NetSpec("resnet18", 32, 8)  # --quick


def torchvision_retinanet(spec: NetSpec):
  """torchvision's RetinaNet as `retinanet_resnet50_fpn` builds it with pretrained weights (frozen BN,
  stem and layer1 frozen: our `freeze_at=2`), with random weights, and its resize disabled."""
  import torch
  import torchvision
  from torchvision.models.detection import RetinaNet
  from torchvision.models.detection.backbone_utils import BackboneWithFPN
  from torchvision.ops import feature_pyramid_network, misc

  torch.manual_seed(0)
  body = getattr(torchvision.models, spec.backbone)(weights=None, norm_layer=misc.FrozenBatchNorm2d)
  for name, parameter in body.named_parameters():
    if not name.startswith(("layer2", "layer3", "layer4")):
      parameter.requires_grad_(False)
  in_channels = [body.inplanes // 4, body.inplanes // 2, body.inplanes]
  backbone = BackboneWithFPN(
      body, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, spec.channels,
      extra_blocks=feature_pyramid_network.LastLevelP6P7(spec.channels, spec.channels))
  model = RetinaNet(backbone, spec.num_classes, detections_per_img=100)
  model.transform.resize = lambda image, target=None: (image, target)  # inputs are network-sized
  return model


def informative_weights(model, images) -> None:
  """Random weights under which both post-processings do real work: non-trivial frozen-BN statistics,
  unit-gain head towers, class logits ~N(-6.5, 1.2) (thousands of candidates above the 0.05 score
  threshold, as a trained model) and box deltas ~N(0, 0.3)."""
  import torch
  from torchvision.ops import misc

  gen = torch.Generator().manual_seed(0)
  uniform = lambda t, low, high: t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, misc.FrozenBatchNorm2d):
        uniform(module.running_mean, -0.2, 0.2)
        uniform(module.running_var, 0.5, 1.5)
        uniform(module.weight, 0.5, 1.0)
        uniform(module.bias, -0.2, 0.2)
    for module in model.head.modules():
      if isinstance(module, torch.nn.Conv2d):
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                            * (2.0 / (module.in_channels * 9)) ** 0.5)
        uniform(module.bias, -0.1, 0.1)
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    for subnet, predictor, std in ((model.head.classification_head, "cls_logits", 1.2),
                                   (model.head.regression_head, "bbox_reg", 0.3)):
      conv = getattr(subnet, predictor)
      conv.bias.zero_()
      out = torch.cat([conv(subnet.conv(f)).flatten() for f in features])
      conv.weight.mul_(std / out.std())
    uniform(model.head.classification_head.cls_logits.bias, -7.0, -6.0)


def converted_state(torch_model, spec: NetSpec) -> dict:
  from retinanet_jax import weights
  state_dict = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
  return weights.convert_state_dict(state_dict, source="torchvision_v1",
                                    model_config=spec.our_fields())


def torch_images(images_uint8):
  """uint8 NHWC NumPy -> torchvision's list of CHW float images in 0-1 (part of the peer's work, as
  our normalization is part of ours)."""
  import torch
  return [torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in images_uint8]


def torch_op_table(fn: Callable[[], object], *, top: int = 10) -> str:
  """torchvision's per-operator profile of one call of `fn` (ATen self CPU time)."""
  from torch.profiler import ProfilerActivity, profile

  fn()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    fn()
  events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
  total = sum(e.self_cpu_time_total for e in events) or 1
  lines = ["| torchvision operator | self CPU ms | share | calls |", "|---|---|---|---|"]
  for e in events[:top]:
    lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e3:.0f} | "
                 f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count} |")
  return "\n".join(lines)


def _profile_section(title: str, run: Callable[[], object], compiled, peer: Callable[[], object]):
  from retinanet_jax import profiling
  ours = profiling.op_profile(run, compiled, repeats=2)
  PROFILES.append(f"### {title}\n\nOurs, per XLA operation (XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`):"
                  f"\n\n{profiling.format_profile(ours, matmul_flops_per_second=MATMUL_FLOPS_PER_SECOND[0])}"
                  f"\n\ntorchvision, per ATen operator:\n\n{torch_op_table(peer)}\n")


# ----------------------------------------------------------------------------------------------
# model: inference
# ----------------------------------------------------------------------------------------------


def bench_model(quick: bool, repeats: int) -> list[Row]:
  import jax
  import numpy as np
  import torch
  from flax import nnx

  from retinanet_jax import profiling, weights
  from retinanet_jax.models import retinanet

  spec = TINY_NET if quick else FULL_NET
  sizes = ((96, 96), (96, 150)) if quick else ((512, 512), (800, 1333))
  rng = np.random.default_rng(0)
  torch_model = torchvision_retinanet(spec).eval()
  calibration = rng.integers(0, 256, (1,) + sizes[0] + (3,), dtype=np.uint8)
  informative_weights(torch_model, torch_images(calibration))
  config = retinanet.RetinaNetConfig(**spec.our_fields())
  model = nnx.eval_shape(lambda: retinanet.build_model(config, rngs=nnx.Rngs(0)))
  weights.load_into(model, converted_state(torch_model, spec))
  graphdef, state = nnx.split(model)

  def detect(state, images, image_hw, scale):
    return retinanet.detect(nnx.merge(graphdef, state), images, image_hw, scale, max_detections=100)

  rows = []
  for h, w in sizes:
    padded = (-(-h // 32) * 32, -(-w // 32) * 32)  # torchvision's size_divisible
    image = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    batch = np.zeros((1,) + padded + (3,), np.uint8)
    batch[:, :h, :w] = image
    hw, scale = np.array([[h, w]], np.int32), np.ones((1, 2), np.float32)

    def peer():
      with torch.inference_mode():
        return torch_model(torch_images(image))

    start = time.perf_counter()
    lowered = jax.jit(detect).lower(state, batch, hw, scale)
    traced = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - traced
    ours = lambda: _block(compiled(state, batch, hw, scale))
    ours()
    first = Timing(time.perf_counter() - start, 0.0)
    peer_first = _timed(peer)
    rows.append(Row("model", f"inference {h}x{w}: first call (ours: trace + compile + run)", first,
                    peer_first, 0.0, f"ours: trace {traced:.1f} s, compile {compile_s:.1f} s"))
    ours_t, peer_t = side_by_side(ours, peer, repeats)
    rows.append(Row("model", f"inference {h}x{w} (padded {padded[0]}x{padded[1]}), batch 1: "
                    "normalize + network + post-processing", ours_t, peer_t,
                    profiling.compiled_flops(compiled)))
    if FLAGS.profile and (h, w) == sizes[0]:
      _profile_section(f"Inference {h}x{w}, batch 1", ours, compiled, peer)
  return rows


# ----------------------------------------------------------------------------------------------
# train: one optimizer step, and the compilation of one
# ----------------------------------------------------------------------------------------------


def _random_targets(rng, batch: int, size: int, num_classes: int, slots: int = 8):
  import numpy as np
  xy = rng.uniform(0, size * 0.6, (batch, slots, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(size * 0.05, size * 0.4, (batch, slots, 2))], -1)
  labels = rng.integers(1, num_classes, (batch, slots))
  return boxes.astype(np.float32), labels.astype(np.int32)


def our_training(spec: NetSpec, size: int, batch: int, *, state_dict: dict, seed: int = 0,
                 dtype: str = "float32"):
  """`(step, state, device batch, host batch, timings)`: our compiled training step at `size`x`size`
  computing in `dtype`, its initial state with the weights `state_dict`, a batch, and trace/compile
  seconds. `step(state, batch)` returns `(state, metrics)` (and donates `state` on accelerators)."""
  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from configs import r50_fpn
  from retinanet_jax import anchors as anchor_lib
  from retinanet_jax import train, weights

  config = r50_fpn.get_config()
  config.model.update(spec.our_fields())
  config.loss.box_loss = "l1"  # torchvision v1's box loss
  config.train.batch_size = batch
  config.train.warmup_steps = 0
  config.model.dtype = dtype
  mesh = train.make_mesh(jax.devices()[:1])
  # Abstract, then loaded: skips the eager random initialization (seconds of small compilations).
  model = nnx.eval_shape(lambda: train.create_model(config, seed=seed))
  weights.load_into(model, state_dict)
  tx = train.make_optimizer(config.train)
  graphdef, state = train.initial_state(model, tx, config)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  anchors = anchor_lib.generate_anchors((size, size), config=train.anchor_config(config)).boxes
  rng = np.random.default_rng(seed)
  boxes, labels = _random_targets(rng, batch, size, spec.num_classes)
  host_batch = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                "image_hw": np.full((batch, 2), size, np.int32), "boxes": boxes, "labels": labels,
                "box_mask": np.ones(labels.shape, bool), "is_crowd": np.zeros(labels.shape, bool)}
  device_batch = jax.device_put(host_batch, NamedSharding(mesh, P(train.DATA_AXIS)))
  step = train.compile_train_step(graphdef, tx, anchors, config, mesh,
                                  train.learning_rate_schedule(config.train))
  start = time.perf_counter()
  lowered = step.lower(state, device_batch)
  traced = time.perf_counter() - start
  compiled = lowered.compile()
  timings = {"trace": traced, "compile": time.perf_counter() - start - traced}
  return compiled, state, device_batch, host_batch, timings


def torchvision_training(torch_model, host_batch):
  """A closure running torchvision's training step (train mode, forward with targets, backward, SGD
  with momentum 0.9 and weight decay 1e-4, as our config) on the same images and boxes."""
  import torch
  torch_model.train()
  optimizer = torch.optim.SGD([p for p in torch_model.parameters() if p.requires_grad], lr=0.01,
                              momentum=0.9, weight_decay=1e-4)
  targets = [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(l.astype("int64"))}
             for b, l in zip(host_batch["boxes"], host_batch["labels"])]

  def step():
    optimizer.zero_grad(set_to_none=True)
    losses = torch_model(torch_images(host_batch["image"]), targets)
    loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    return loss

  return step


def bench_train(quick: bool, repeats: int) -> list[Row]:
  from retinanet_jax import profiling

  spec = TINY_NET if quick else FULL_NET
  size, batch = (96, 2) if quick else (512, 2)
  torch_model = torchvision_retinanet(spec)
  compiled, state, device_batch, host_batch, timings = our_training(
      spec, size, batch, state_dict=converted_state(torch_model, spec))
  holder = [state]

  def ours():
    holder[0], metrics = compiled(holder[0], device_batch)
    return _block(metrics["loss"])

  first = Timing(timings["trace"] + timings["compile"] + _timed(ours).wall, 0.0)
  peer = torchvision_training(torch_model, host_batch)
  peer_first = _timed(peer)
  rows = [Row("train", f"training step {size}x{size} batch {batch}: first step (ours: trace + "
              "compile + run)", first, peer_first, 0.0,
              f"ours: trace {timings['trace']:.1f} s, compile {timings['compile']:.1f} s")]
  ours_t, peer_t = side_by_side(ours, peer, repeats, warmup=False)
  rows.append(Row("train", f"training step {size}x{size} batch {batch}: normalize + network + "
                  "matching + loss + backward + SGD", ours_t, peer_t,
                  profiling.compiled_flops(compiled),
                  f"{batch / ours_t.wall:.2f} vs {batch / peer_t.wall:.2f} images/s"))
  if FLAGS.profile:
    _profile_section(f"Training step {size}x{size}, batch {batch}", ours, compiled, peer)
  if FLAGS.compile_cache_rows:
    rows.extend(bench_compile_cache(quick))
  return rows


def compile_cache_child(cache_dir: str, quick: bool) -> dict:
  """In a fresh process: our first training step at 640x640 with the persistent cache in
  `cache_dir`, and torchvision's first step at the same size."""
  import jax

  xla_flags.enable_compilation_cache(cache_dir)
  spec = TINY_NET if quick else FULL_NET
  size = 96 if quick else 640
  torch_model = torchvision_retinanet(spec)
  compiled, state, device_batch, host_batch, timings = our_training(
      spec, size, 2, state_dict=converted_state(torch_model, spec))
  start = time.perf_counter()
  _, metrics = compiled(state, device_batch)
  jax.block_until_ready(metrics["loss"])
  ours = timings["trace"] + timings["compile"] + time.perf_counter() - start
  peer = _timed(torchvision_training(torch_model, host_batch)).wall
  entries = [os.path.join(cache_dir, f) for f in os.listdir(cache_dir)]
  return {"size": size, "ours": ours, "peer": peer, **timings, "entries": len(entries),
          "bytes": sum(os.path.getsize(f) for f in entries if os.path.isfile(f))}


def bench_compile_cache(quick: bool) -> list[Row]:
  rows = []
  with tempfile.TemporaryDirectory() as cache_dir:
    for label in ("empty persistent cache", "second process, persistent cache filled by the first"):
      command = [sys.executable, os.path.abspath(__file__), f"--compile_cache_child={cache_dir}",
                 f"--quick={quick}", f"--torch_threads={FLAGS.torch_threads}"]
      done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
      lines = [l for l in done.stdout.splitlines() if l.startswith("COMPILE_CACHE_RESULT ")]
      if done.returncode or not lines:
        raise RuntimeError(f"compile-cache child failed ({done.returncode}):\n{done.stderr[-3000:]}")
      r = json.loads(lines[-1].split(" ", 1)[1])
      rows.append(Row("train", f"training step {r['size']}x{r['size']} batch 2, new process, {label}: "
                      "first step (ours: trace + compile + run)", Timing(r["ours"], 0.0),
                      Timing(r["peer"], 0.0), 0.0,
                      f"ours: trace {r['trace']:.1f} s, compile {r['compile']:.1f} s; cache "
                      f"{r['entries']} entries, {r['bytes'] / 1e6:.0f} MB"))
  return rows


# ----------------------------------------------------------------------------------------------
# input: the host pipeline
# ----------------------------------------------------------------------------------------------


def _encoded_examples(dataset_name: str, data_dir: str) -> list:
  """(JPEG bytes, boxes [N, 4] xyxy pixels, labels [N]) of every training image of the dataset."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(dataset_name, data_dir=data_dir)
  dataset = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  return [(bytes(r["image"]), r["objects"]["bbox_xyxy"], r["objects"]["label"])
          for r in tfds.as_numpy(dataset)]


def torchvision_input(examples, *, mode: str, image_size: int, min_size: int, max_size: int,
                      padded_hw, batch_size: int):
  """A closure producing one batch as torchvision's detection references would (decode_jpeg,
  transforms.v2 with boxes, horizontal flip), zero-padded to our batch size and shape."""
  import torch
  import torchvision
  from torchvision import tv_tensors
  from torchvision.transforms import v2

  if mode == "lsj":
    transform = v2.Compose([
        v2.ScaleJitter((image_size, image_size), scale_range=(0.1, 2.0), antialias=True),
        v2.RandomCrop((image_size, image_size), pad_if_needed=True),
        v2.RandomHorizontalFlip(0.5), v2.SanitizeBoundingBoxes()])
  else:
    transform = v2.Compose([v2.RandomShortestSize(min_size, max_size=max_size, antialias=True),
                            v2.RandomHorizontalFlip(0.5), v2.SanitizeBoundingBoxes()])
  position = [0]

  def next_batch():
    images = torch.zeros((batch_size, 3) + tuple(padded_hw), dtype=torch.uint8)
    targets = []
    for i in range(batch_size):
      data, boxes, labels = examples[position[0] % len(examples)]
      position[0] += 1
      image = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
      target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                                  canvas_size=tuple(image.shape[-2:])),
                "labels": torch.from_numpy(labels)}
      image, target = transform(image, target)
      images[i, :, :image.shape[1], :image.shape[2]] = image
      targets.append(target)
    return images, targets

  return next_batch


def bench_input(quick: bool, repeats: int) -> list[Row]:
  import torch

  from retinanet_jax.data import benchmark as data_benchmark
  from retinanet_jax.data import transforms

  data_dir = FLAGS.data_dir
  seconds = 0.5 if quick else FLAGS.input_seconds
  batch_size = 4 if quick else 16
  rows = []
  for mode in ("lsj", "resize"):
    if quick:  # a tiny stand-in dataset (as tests/data/test_benchmark.py does)
      tiny = functools.partial(data_benchmark.build_benchmark_dataset, num_images=8, height=72,
                               width=96)
      with mock.patch.object(data_benchmark, "build_benchmark_dataset", tiny):
        config = data_benchmark.benchmark_data_config(data_dir, mode=mode)
      config.image_size, config.max_size, config.train_min_size_range = 128, 160, (96, 96)
    else:
      config = data_benchmark.benchmark_data_config(data_dir, mode=mode)
    padded_hw = transforms.padded_hw(transforms.TransformConfig.from_data_config(config))
    examples = _encoded_examples(config.name, data_dir)
    peer_batch = torchvision_input(
        examples, mode=mode, image_size=config.image_size, min_size=config.train_min_size_range[0],
        max_size=config.max_size, padded_hw=padded_hw, batch_size=batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a DataLoader worker: one process per core, one thread each
    ours, peer = [], []
    try:
      for _ in range(1 if quick else 2):
        ours.append(data_benchmark.input_images_per_second(config, seconds=seconds,
                                                           batch_size=batch_size, warmup_batches=2))
        peer_batch()
        images, wall, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall < seconds:
          images += len(peer_batch()[0])
        peer.append((images, time.perf_counter() - wall, time.process_time() - cpu))
    finally:
      torch.set_num_threads(threads)
    best = max(ours, key=lambda r: r.images_per_second_per_core)
    peer_images, peer_wall, peer_cpu = max(peer, key=lambda p: p[0] / p[1])
    name = (f"LSJ {config.image_size} (scale 0.1-2.0, crop/pad, flip)" if mode == "lsj" else
            f"resize {config.train_min_size_range[0]}/{config.max_size} + flip")
    rows.append(Row(
        "input", f"input pipeline {name}, padded {padded_hw[0]}x{padded_hw[1]}: time per image "
        "and core", Timing(1 / best.images_per_second_per_core, 1 / best.images_per_cpu_second),
        Timing(peer_wall / peer_images, peer_cpu / peer_images), 0.0,
        f"ours {best.images_per_second_per_core:.1f} images/s per core ({best.cores} cores, tf.data), "
        f"{best.images_per_cpu_second:.1f} per CPU-s; torchvision {peer_images / peer_wall:.1f} "
        "images/s on 1 core"))
  return rows


# ----------------------------------------------------------------------------------------------
# accelerator: bfloat16 training and inference on the device, torchvision with AMP beside it
# ----------------------------------------------------------------------------------------------

# Dense bfloat16 peaks (TFLOP/s, no sparsity) by device kind, most specific name first.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                    ("L4", 121.0), ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0),
                    ("TPU v4", 275.0))


def peak_flops_per_second() -> tuple[float, str]:
  """The device's bfloat16 peak (FLOP/s) and where it came from: --peak_tflops, the table above by
  `device_kind`, or (a CPU, or a device not in the table) the float32 matmul rate measured in this
  run, which is what the device reaches rather than its specification."""
  import jax
  if FLAGS.peak_tflops > 0:
    return FLAGS.peak_tflops * 1e12, f"{FLAGS.peak_tflops:g} TFLOP/s (--peak_tflops)"
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12, f"{tflops:g} TFLOP/s, the bfloat16 peak of {kind}"
  rate = MATMUL_FLOPS_PER_SECOND[0]
  return rate, f"{rate / 1e12:.3g} TFLOP/s, the float32 matmul rate measured on {kind}"


def torch_device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
  import torch
  if device == "cuda":
    torch.cuda.synchronize()


def is_out_of_memory(error: BaseException) -> bool:
  text = f"{type(error).__name__}: {error}"
  return "RESOURCE_EXHAUSTED" in text or "OutOfMemory" in text or "out of memory" in text.lower()


def largest_fitting(measure: Callable[[int], object], batches) -> tuple[int, object]:
  """`(batch, measure(batch))` for the largest of the increasing `batches` that fits in memory: tries
  them in order and stops at the first out-of-memory error. Other errors propagate."""
  best = None
  for batch in batches:
    try:
      best = (batch, measure(batch))
    except Exception as error:  # pylint: disable=broad-except
      if not is_out_of_memory(error):
        raise
      print(f"batch {batch}: out of memory ({type(error).__name__})", file=sys.stderr, flush=True)
      break
    finally:
      import gc
      gc.collect()
      if torch_device() == "cuda":
        import torch
        torch.cuda.empty_cache()
  if best is None:
    raise RuntimeError(f"no batch size of {list(batches)} fits in device memory")
  return best


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  return statistics.median(_timed(fn).wall for _ in range(repeats))


def _our_train_seconds(spec: NetSpec, size: int, batch: int, state_dict: dict, repeats: int):
  compiled, state, device_batch, _, _ = our_training(spec, size, batch, state_dict=state_dict,
                                                     dtype="bfloat16")
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], device_batch)
    return _block(metrics["loss"])

  from retinanet_jax import profiling
  return _median_seconds(step, repeats), profiling.compiled_flops(compiled)


def _torchvision_train_seconds(spec: NetSpec, size: int, batch: int, repeats: int) -> float:
  """torchvision's training step in bfloat16 autocast (AMP; float32 weights and SGD) on its device,
  the uint8 batch already there (its conversion to float is part of the step, as ours)."""
  import numpy as np
  import torch

  device = torch_device()
  model = torchvision_retinanet(spec).to(device).train()
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                              momentum=0.9, weight_decay=1e-4)
  rng = np.random.default_rng(0)
  boxes, labels = _random_targets(rng, batch, size, spec.num_classes)
  images = torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)).to(device)
  targets = [{"boxes": torch.from_numpy(b).to(device),
              "labels": torch.from_numpy(l.astype(np.int64)).to(device)} for b, l in zip(boxes, labels)]

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      losses = model([image.float() / 255 for image in images], targets)
      loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    _sync(device)
    return loss

  try:
    return _median_seconds(step, repeats)
  finally:
    del model, optimizer, images


def _detectors(spec: NetSpec, size: tuple[int, int]):
  """(our jitted bfloat16 detect(state, images, hw, scale), its state, torchvision's model in eval
  mode on its device): the same informative random weights (see `informative_weights`)."""
  import jax
  import numpy as np
  from flax import nnx

  from retinanet_jax import weights
  from retinanet_jax.models import retinanet

  torch_model = torchvision_retinanet(spec).eval()
  calibration = np.random.default_rng(0).integers(0, 256, (1,) + size + (3,), dtype=np.uint8)
  informative_weights(torch_model, torch_images(calibration))
  config = retinanet.RetinaNetConfig(**{**spec.our_fields(), "dtype": "bfloat16"})
  model = nnx.eval_shape(lambda: retinanet.build_model(config, rngs=nnx.Rngs(0)))
  weights.load_into(model, converted_state(torch_model, spec))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state)

  @jax.jit
  def detect(state, images, image_hw, scale):
    return retinanet.detect(nnx.merge(graphdef, state), images, image_hw, scale, max_detections=100)

  return detect, state, torch_model.to(torch_device())


def _inference_rows(spec: NetSpec, size: tuple[int, int], batches, repeats: int) -> list[Row]:
  import jax
  import numpy as np
  import torch

  from retinanet_jax import profiling

  detect, state, torch_model = _detectors(spec, size)
  device = torch_device()
  h, w = size
  padded = (-(-h // 32) * 32, -(-w // 32) * 32)
  rng = np.random.default_rng(1)
  rows = []
  for batch in batches:
    images = np.zeros((batch,) + padded + (3,), np.uint8)
    images[:, :h, :w] = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    args = jax.device_put((images, np.full((batch, 2), [h, w], np.int32),
                           np.ones((batch, 2), np.float32)))
    compiled = detect.lower(state, *args).compile()
    torch_batch = torch.from_numpy(np.ascontiguousarray(images[:, :h, :w].transpose(0, 3, 1, 2)))
    torch_batch = torch_batch.to(device)

    def peer():
      with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = torch_model([image.float() / 255 for image in torch_batch])
      _sync(device)
      return out

    ours_t, peer_t = side_by_side(lambda: _block(compiled(state, *args)), peer, repeats)
    what = "latency" if batch == 1 else "throughput"
    rows.append(Row("accelerator", f"inference bfloat16 {h}x{w} (padded {padded[0]}x{padded[1]}), "
                    f"batch {batch} ({what}): normalize + network + post-processing with NMS "
                    "(torchvision: AMP)", ours_t, peer_t, profiling.compiled_flops(compiled),
                    f"{batch / ours_t.wall:.1f} vs {batch / peer_t.wall:.1f} images/s"))
  return rows


def bench_accelerator(quick: bool, repeats: int) -> list[Row]:
  """bfloat16 training at the largest batch that fits and inference, ours against torchvision."""
  spec = TINY_NET if quick else FULL_NET
  sizes = (96,) if quick else tuple(int(v) for v in FLAGS.accelerator_sizes.split(","))
  batches = (2, 4) if quick else tuple(int(v) for v in FLAGS.accelerator_batches.split(","))
  peak, peak_source = peak_flops_per_second()
  state_dict = converted_state(torchvision_retinanet(spec), spec)
  rows = []
  for size in sizes:
    ours_batch, (ours_s, flops) = largest_fitting(
        lambda b: _our_train_seconds(spec, size, b, state_dict, repeats), batches)
    peer_batch, peer_s = largest_fitting(
        lambda b: _torchvision_train_seconds(spec, size, b, repeats), batches)
    ours_per_image, peer_per_image = ours_s / ours_batch, peer_s / peer_batch
    mfu = flops / ours_s / peak if flops and peak else 0.0
    peer_mfu = flops / ours_batch * peer_batch / peer_s / peak if flops and peak else 0.0
    rows.append(Row(
        "accelerator", f"training step bfloat16 {size}x{size} at the largest batch that fits "
        f"(ours {ours_batch}, torchvision {peer_batch}, AMP): time per image",
        Timing(ours_per_image, 0.0), Timing(peer_per_image, 0.0), flops / ours_batch,
        f"{1 / ours_per_image:.1f} vs {1 / peer_per_image:.1f} images/s; model FLOP utilization "
        f"{100 * mfu:.1f}% vs {100 * peer_mfu:.1f}% of {peak_source}"))
  inference_size = (96, 150) if quick else (800, 1333)
  rows.extend(_inference_rows(spec, inference_size, (1, 4) if quick else (1, 32), repeats))
  return rows


SUITE_CASES = {
    "core": (bench_focal_loss, bench_matching, bench_postprocess),
    "model": (bench_model,),
    "train": (bench_train,),
    "input": (bench_input,),
    "accelerator": (bench_accelerator,),
}


CPU_SUITES = ("core", "model", "train", "input")


def suite_cases(suite: str, *, quick: bool) -> tuple:
  """The cases of `suite`. 'all' is the four CPU suites, plus the accelerator suite in --quick (so
  that the tests run it on the CPU). The CPU suites run torchvision on the CPU, so on a GPU or TPU
  host they would compare different hardware: there they need JAX_PLATFORMS=cpu, and the device rows
  come from --suite=accelerator."""
  import jax
  if suite not in SUITES:
    raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
  names = list(CPU_SUITES) + (["accelerator"] if quick else []) if suite == "all" else [suite]
  if jax.default_backend() != "cpu" and set(names) & set(CPU_SUITES):
    raise ValueError(f"--suite={suite} compares against torchvision on the CPU but JAX runs on "
                     f"{jax.default_backend()}: run it with JAX_PLATFORMS=cpu, and use "
                     "--suite=accelerator for this device")
  return tuple(c for name in names for c in SUITE_CASES[name])


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def machine_description() -> str:
  import jax
  import torch
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
      cpu = f"{names[0]} x {len(names)} threads" if names else cpu
  except OSError:
    pass
  load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
  peer_device = f"; {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
  return (f"{cpu}; load average (1/5/15 min) {LOAD_AT_START[0]} at the start, {load} at the end; "
          f"jax {jax.__version__} "
          f"({jax.default_backend()}, {jax.device_count()} x {jax.devices()[0].device_kind}), "
          f"XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads{peer_device}), torchvision peer")


def format_table(rows: list[Row]) -> str:
  peak = MATMUL_FLOPS_PER_SECOND[0]
  lines = ["| suite | case | ours (ms) | torchvision (ms) | torchvision / ours | same, CPU time | "
           f"GFLOP/s ours / torchvision | ours % of matmul ({peak / 1e9:.0f} GFLOP/s) | note |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ours_rate, peer_rate = _flops_rate(r)
    rate = f"{ours_rate / 1e9:.3g} / {peer_rate / 1e9:.3g}" if r.flops else ""
    share = f"{100 * ours_rate / peak:.0f}%" if r.flops and peak else ""
    cpu = f"{r.cpu_ratio:.2f}x" if r.ours.cpu > 0 and r.peer.cpu > 0 else ""
    lines.append(f"| {r.suite} | {r.case} | {r.ours.wall * 1e3:.1f} | {r.peer.wall * 1e3:.1f} | "
                 f"{r.ratio:.2f}x | {cpu} | {rate} | {share} | {r.note} |")
  return "\n".join(lines)


def write_section(path: str, name: str, body: str) -> None:
  """Replaces the text between `<!-- name:begin -->` and `<!-- name:end -->` (appended if absent)."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  if begin not in text:
    text = text.rstrip("\n") + "\n\n" + begin + "\n" + end + "\n"
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(head + begin + "\n" + body.strip("\n") + "\n" + end + tail)


def run(suite: str, *, quick: bool, repeats: int) -> list[Row]:
  cases = suite_cases(suite, quick=quick)
  repeats = 1 if quick else repeats
  rows = []
  for case in (bench_machine,) + cases:
    start = time.perf_counter()
    rows.extend(case(quick, repeats))
    print(f"{case.__name__}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  update_matmul_rate(quick, repeats)  # again at the end: the machine may be quieter now
  return rows


def main(argv):
  del argv
  if FLAGS.xla_flags is not None:
    xla_flags.apply_xla_flags(FLAGS.xla_flags)
  else:  # --quick is a smoke test: whatever compiles fastest (3x); its times mean nothing
    xla_flags.apply_xla_flags(QUICK_XLA_FLAGS if FLAGS.quick else xla_flags.CPU_FLAGS)
  # torch first: importing torchvision (triton) after TensorFlow crashes in native code.
  import torch
  import torchvision  # noqa: F401  pylint: disable=unused-import
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  if FLAGS.compile_cache_child:
    result = compile_cache_child(FLAGS.compile_cache_child, FLAGS.quick)
    print("COMPILE_CACHE_RESULT " + json.dumps(result), flush=True)
    return
  started = time.time()
  if hasattr(os, "getloadavg"):
    LOAD_AT_START[0] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
  rows = run(FLAGS.suite, quick=FLAGS.quick, repeats=FLAGS.repeats)
  command = " ".join(["python scripts/benchmark.py"] + sys.argv[1:])
  header = (f"Measured {datetime.datetime.now().isoformat(timespec='minutes')} in "
            f"{(time.time() - started) / 60:.0f} min on {machine_description()}.\n"
            f"Command: `{command}`.")
  table = format_table(rows)
  print(header + "\n\n" + table)
  for profile in PROFILES:
    print("\n" + profile)
  if FLAGS.write:
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    # One section per suite ('all': the main table), so that a device run never replaces the CPU table.
    write_section(path, "benchmark" if FLAGS.suite == "all" else f"benchmark-{FLAGS.suite}",
                  header + "\n\n" + table)
    if PROFILES:
      write_section(path, "profile", "\n".join(PROFILES))


if __name__ == "__main__":
  app.run(main)
