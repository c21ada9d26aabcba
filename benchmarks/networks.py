"""The two RetinaNets with the same weights, our training step and torchvision's, per-operator
profiles of both.

The networks are torchvision's `retinanet_resnet50_fpn` layout (v1: P6 from P5, frozen batch norm,
stem and layer1 frozen, 91 classes) with random weights, converted to ours with `retinanet_jax/checkpoints/weights.py`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

from benchmarks.timing import Session


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """A RetinaNet both libraries can build: torchvision's v1 layout (P6 from P5) with frozen BN."""

  backbone: str
  channels: int
  num_classes: int

  def our_fields(self) -> dict:
    from retinanet_jax.checkpoints import weights
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


def informative_weights(model, images, *, seed: int = 0) -> None:
  """Random weights under which a comparison of the two networks (and of their post-processings)
  means something: non-trivial batch-norm statistics and affine parameters (frozen, trainable or
  group norms), head towers at unit gain, and predictors scaled on the features of `images` (CHW float
  0-1 tensors) so that class logits are ~N(-6.5, 1.2) (hundreds to thousands of candidates above the
  0.05 score threshold, as with a trained model) and box deltas ~N(0, 0.3). Also the model tests'
  weights (tests/models/torchvision_reference.py)."""
  import torch
  from torchvision.ops import misc

  gen = torch.Generator().manual_seed(seed)
  uniform = lambda t, low, high: t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (misc.FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
        uniform(module.running_mean, -0.2, 0.2)
        uniform(module.running_var, 0.5, 1.5)
        uniform(module.weight, 0.5, 1.0)
        uniform(module.bias, -0.2, 0.2)
      elif isinstance(module, torch.nn.GroupNorm):
        uniform(module.weight, 0.5, 1.5)
        uniform(module.bias, -0.2, 0.2)
    for module in model.head.modules():
      if isinstance(module, torch.nn.Conv2d):
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                            * (2.0 / (module.in_channels * 9)) ** 0.5)
        if module.bias is not None:
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
  from retinanet_jax.checkpoints import weights
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


def profile_section(session: Session, title: str, run: Callable[[], object], compiled,
                    peer: Callable[[], object]) -> None:
  """Adds to `session.profiles` our per-XLA-operation profile of `run` (which executes `compiled`)
  and torchvision's per-operator profile of `peer`."""
  from benchmarks import profiling
  ours = profiling.op_profile(run, compiled, repeats=2)
  rate = session.matmul_flops_per_second
  session.profiles.append(f"### {title}\n\nOurs, per XLA operation (XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`):"
                  f"\n\n{profiling.format_profile(ours, matmul_flops_per_second=rate)}"
                  f"\n\ntorchvision, per ATen operator:\n\n{torch_op_table(peer)}\n")


# ----------------------------------------------------------------------------------------------
# model: inference
# ----------------------------------------------------------------------------------------------


def random_targets(rng, batch: int, size: int, num_classes: int, slots: int = 8):
  import numpy as np
  xy = rng.uniform(0, size * 0.6, (batch, slots, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(size * 0.05, size * 0.4, (batch, slots, 2))], -1)
  labels = rng.integers(1, num_classes, (batch, slots))
  return boxes.astype(np.float32), labels.astype(np.int32)


def our_training(spec: NetSpec, size: int, batch: int, *, state_dict: dict, seed: int = 0,
                 dtype: str = "float32", targets=None):
  """`(step, state, device batch, host batch, timings)`: our compiled training step at `size`x`size`
  computing in `dtype`, its initial state with the weights `state_dict`, a batch, and trace/compile
  seconds. `step(state, batch)` returns `(state, metrics)` (and donates `state` on accelerators).
  `targets`: `(boxes [B, M, 4], labels [B, M])` instead of 8 random boxes per image."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from retinanet_jax import anchors as anchor_lib
  from retinanet_jax import config as config_lib
  from retinanet_jax.runtime import mesh as mesh_lib
  from retinanet_jax.training import train_state, train_step

  config = config_lib.default_config()
  config.model.update(spec.our_fields())
  config.loss.box_loss = "l1"  # torchvision v1's box loss
  config.train.batch_size = batch
  config.train.warmup_steps = 0
  config.model.dtype = dtype
  config.seed = seed
  config = config_lib.Config.from_config_dict(config)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  # Loaded into the abstract model: skips the eager random initialization (seconds of small
  # compilations).
  setup = train_state.create_train_state(config, mesh, initial_weights=state_dict)
  state = setup.state
  anchors = anchor_lib.generate_anchors((size, size), config=config.anchors).boxes
  rng = np.random.default_rng(seed)
  boxes, labels = targets if targets is not None else random_targets(rng, batch, size,
                                                                      spec.num_classes)
  host_batch = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                "image_hw": np.full((batch, 2), size, np.int32), "boxes": boxes, "labels": labels,
                "box_mask": np.ones(labels.shape, bool), "is_crowd": np.zeros(labels.shape, bool)}
  device_batch = jax.device_put(host_batch, NamedSharding(mesh, P(mesh_lib.DATA_AXIS)))
  step = train_step.compile_train_step(setup, config, mesh, anchors)
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
