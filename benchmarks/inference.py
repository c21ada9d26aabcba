"""The model suite: inference (normalization, R50-FPN, post-processing; jitted, batch 1) at 512x512 and
800x1333 against torchvision's RetinaNet in eval mode on the same weights, its resize disabled (the
input is already at network size), and the time to the first result of each."""

from __future__ import annotations

import time

from benchmarks import networks
from benchmarks.networks import FULL_NET, TINY_NET
from benchmarks.timing import Row, Session, Timing, block, side_by_side, timed


def bench_model(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  import jax
  import numpy as np
  import torch
  from flax import nnx

  from benchmarks import profiling
  from retinanet_jax import checkpoints
  from retinanet_jax.models import retinanet

  spec = TINY_NET if quick else FULL_NET
  sizes = ((96, 96), (96, 150)) if quick else ((512, 512), (800, 1333))
  rng = np.random.default_rng(0)
  torch_model = networks.torchvision_retinanet(spec).eval()
  calibration = rng.integers(0, 256, (1,) + sizes[0] + (3,), dtype=np.uint8)
  networks.informative_weights(torch_model, networks.torch_images(calibration))
  config = retinanet.RetinaNetConfig(**spec.our_fields())
  model = nnx.eval_shape(lambda: retinanet.build_model(config, rngs=nnx.Rngs(0)))
  checkpoints.load_into(model, networks.converted_state(torch_model, spec))
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
        return torch_model(networks.torch_images(image))

    start = time.perf_counter()
    lowered = jax.jit(detect).lower(state, batch, hw, scale)
    traced = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - traced
    ours = lambda: block(compiled(state, batch, hw, scale))
    ours()
    first = Timing(time.perf_counter() - start, 0.0)
    peer_first = timed(peer)
    rows.append(Row("model", f"inference {h}x{w}: first call (ours: trace + compile + run)", first,
                    peer_first, 0.0, f"ours: trace {traced:.1f} s, compile {compile_s:.1f} s"))
    ours_t, peer_t = side_by_side(ours, peer, repeats)
    rows.append(Row("model", f"inference {h}x{w} (padded {padded[0]}x{padded[1]}), batch 1: "
                    "normalize + network + post-processing", ours_t, peer_t,
                    profiling.compiled_flops(compiled)))
    if session.options.profile and (h, w) == sizes[0]:
      networks.profile_section(session, f"Inference {h}x{w}, batch 1", ours, compiled, peer)
  return rows
