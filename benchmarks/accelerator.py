"""The accelerator suite: bfloat16 on the device JAX runs on (a GPU or TPU), with torchvision in
bfloat16 autocast (AMP) on the same GPU (torch's CPU elsewhere): training R50-FPN at the largest batch
that fits, as time per image, with the model FLOP utilization against the device's bfloat16 peak;
inference at 800x1333 with NMS, batch 1 latency and batch 32 throughput."""

from __future__ import annotations

import statistics
import sys
from typing import Callable

from benchmarks import networks
from benchmarks.networks import FULL_NET, TINY_NET, NetSpec
from benchmarks.timing import Row, Session, Timing, block, side_by_side, timed


# Dense bfloat16 peaks (TFLOP/s, no sparsity) by device kind, most specific name first.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                    ("L4", 121.0), ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0),
                    ("TPU v4", 275.0))


def peak_flops_per_second(session: Session) -> tuple[float, str]:
  """The device's bfloat16 peak (FLOP/s) and where it came from: `options.peak_tflops`, the table
  above by `device_kind`, or (a CPU, or a device not in the table) the float32 matmul rate measured in
  this run, which is what the device reaches rather than its specification."""
  import jax
  given = session.options.peak_tflops
  if given > 0:
    return given * 1e12, f"{given:g} TFLOP/s (--peak_tflops)"
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12, f"{tflops:g} TFLOP/s, the bfloat16 peak of {kind}"
  rate = session.matmul_flops_per_second
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
  return statistics.median(timed(fn).wall for _ in range(repeats))


def _our_train_seconds(spec: NetSpec, size: int, batch: int, state_dict: dict, repeats: int):
  compiled, state, device_batch, _, _ = networks.our_training(spec, size, batch, state_dict=state_dict,
                                                     dtype="bfloat16")
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], device_batch)
    return block(metrics["loss"])

  from benchmarks import profiling
  return _median_seconds(step, repeats), profiling.compiled_flops(compiled)


def _torchvision_train_seconds(spec: NetSpec, size: int, batch: int, repeats: int) -> float:
  """torchvision's training step in bfloat16 autocast (AMP; float32 weights and SGD) on its device,
  the uint8 batch already there (its conversion to float is part of the step, as ours)."""
  import numpy as np
  import torch

  device = torch_device()
  model = networks.torchvision_retinanet(spec).to(device).train()
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                              momentum=0.9, weight_decay=1e-4)
  rng = np.random.default_rng(0)
  boxes, labels = networks.random_targets(rng, batch, size, spec.num_classes)
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

  from retinanet_jax import checkpoints
  from retinanet_jax.models import retinanet

  torch_model = networks.torchvision_retinanet(spec).eval()
  calibration = np.random.default_rng(0).integers(0, 256, (1,) + size + (3,), dtype=np.uint8)
  networks.informative_weights(torch_model, networks.torch_images(calibration))
  config = retinanet.RetinaNetConfig(**{**spec.our_fields(), "dtype": "bfloat16"})
  model = nnx.eval_shape(lambda: retinanet.build_model(config, rngs=nnx.Rngs(0)))
  checkpoints.load_into(model, networks.converted_state(torch_model, spec))
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

  from benchmarks import profiling

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

    ours_t, peer_t = side_by_side(lambda: block(compiled(state, *args)), peer, repeats)
    what = "latency" if batch == 1 else "throughput"
    rows.append(Row("accelerator", f"inference bfloat16 {h}x{w} (padded {padded[0]}x{padded[1]}), "
                    f"batch {batch} ({what}): normalize + network + post-processing with NMS "
                    "(torchvision: AMP)", ours_t, peer_t, profiling.compiled_flops(compiled),
                    f"{batch / ours_t.wall:.1f} vs {batch / peer_t.wall:.1f} images/s"))
  return rows


def bench_accelerator(session: Session) -> list[Row]:
  """bfloat16 training at the largest batch that fits and inference, ours against torchvision."""
  quick, repeats = session.options.quick, session.options.repeats
  spec = TINY_NET if quick else FULL_NET
  sizes = (96,) if quick else session.options.accelerator_sizes
  batches = (2, 4) if quick else session.options.accelerator_batches
  peak, peak_source = peak_flops_per_second(session)
  state_dict = networks.converted_state(networks.torchvision_retinanet(spec), spec)
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
