"""Helpers shared by the model tests: torchvision RetinaNets with random but informative weights,
their conversions, a real photo of arbitrary size, and a tie-robust detection comparison."""

from __future__ import annotations

import functools
import glob
import os

import numpy as np
import torch
from flax import nnx
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from benchmarks.networks import informative_weights
from retinanet_jax import checkpoints
from retinanet_jax.checkpoints import weights
from retinanet_jax.models import retinanet

TORCHVISION_BUILDERS = {"torchvision_v1": retinanet_resnet50_fpn,
                        "torchvision_v2": retinanet_resnet50_fpn_v2}

# Parity images: sizes that are not multiples of 32, with the same short side so that torchvision's
# resize (min_size=150) is the identity and both implementations see the same pixels.
PARITY_SIZES = ((150, 217), (183, 150))
PARITY_MIN_SIZE = 150

# A real photo on this machine (any will do; the test prints which one it used).
PHOTO_CANDIDATES = (os.environ.get("RETINANET_TEST_PHOTO", ""),
                    "/root/.rustup/toolchains/*/share/doc/rust/html/embedded-book/assets/f3.jpg",
                    "/usr/share/backgrounds/*.jpg")


def parity_images() -> list[np.ndarray]:
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, size + (3,), dtype=np.uint8) for size in PARITY_SIZES]


def to_torch_images(images) -> list[torch.Tensor]:
  """uint8 / 0-255 float HWC NumPy images -> torchvision's CHW float images in 0-1."""
  return [torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 for image in images]


def randomize_torchvision_retinanet(model, calibration_images, *, seed: int = 0) -> None:
  """Random weights that make the comparison meaningful (the benchmark's, which documents them):
  non-trivial batch-norm statistics and affine parameters, head towers at unit gain, and predictors
  scaled so that class logits are ~N(-6.5, 1.2) and box deltas ~N(0, 0.3)."""
  informative_weights(model, calibration_images, seed=seed)


def torchvision_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def convert_torchvision(model, source: str, *, dtype: str = "float32") -> retinanet.RetinaNet:
  """Our RetinaNet with the weights of a torchvision one (BatchNorm eps 1e-5 as a fresh model)."""
  fields = {**weights.source_defaults(source)["model"], "norm_epsilon": 1e-5, "dtype": dtype}
  config = retinanet.RetinaNetConfig(**fields)
  ours = nnx.eval_shape(lambda: retinanet.build_model(config, rngs=nnx.Rngs(0)))
  checkpoints.load_into(ours, weights.convert_state_dict(torchvision_state_dict(model), source=source,
                                                     model_config=config))
  return ours


@functools.lru_cache(maxsize=None)
def torchvision_pair_for(source: str):
  """(source, torchvision model in eval mode with `min_size=PARITY_MIN_SIZE`, our converted model)."""
  torch.manual_seed(0)
  model = TORCHVISION_BUILDERS[source](weights=None, weights_backbone=None, min_size=PARITY_MIN_SIZE,
                                       detections_per_img=1000).eval()
  randomize_torchvision_retinanet(model, to_torch_images(parity_images()))
  return source, model, convert_torchvision(model, source)


def find_photo() -> tuple[np.ndarray, str]:
  """`(uint8 RGB image, description)`: a photo found on disk, else a synthetic image."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  for pattern in PHOTO_CANDIDATES:
    for path in sorted(glob.glob(pattern)) if pattern else ():
      with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), path
  rng = np.random.default_rng(1)
  y, x = np.mgrid[0:477, 0:721]
  smooth = np.stack([128 + 100 * np.sin(x / 37.0 + c) * np.cos(y / 23.0 - c) for c in range(3)], -1)
  image = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
  return image, "synthetic 477x721 image (no photo found on disk)"


def match_detections(ours: dict, ref: dict, *, box_tol: float, score_tol: float) -> dict:
  """One-to-one match of two detection sets, robust to the order of (nearly) tied scores.

  Each reference detection (in descending score order) takes the first unused detection of ours with
  the same class, every box coordinate within `box_tol` and the score within `score_tol`.
  Returns counts and the largest differences among matched pairs.
  """
  used = np.zeros(len(ours["scores"]), bool)
  unmatched, box_diff, score_diff = [], 0.0, 0.0
  for i in np.argsort(-ref["scores"], kind="stable"):
    box_err = np.abs(ours["boxes"] - ref["boxes"][i]).max(axis=1)
    score_err = np.abs(ours["scores"] - ref["scores"][i])
    ok = (~used) & (ours["classes"] == ref["classes"][i]) & (box_err <= box_tol) & (score_err <= score_tol)
    if not ok.any():
      unmatched.append(int(i))
      continue
    j = int(np.argmax(ok))
    used[j] = True
    box_diff, score_diff = max(box_diff, float(box_err[j])), max(score_diff, float(score_err[j]))
  return dict(unmatched=unmatched, extra=int((~used).sum()), box_diff=box_diff, score_diff=score_diff)


def torchvision_detections(result: dict) -> dict:
  return dict(boxes=result["boxes"].numpy(), scores=result["scores"].numpy(),
              classes=result["labels"].numpy())


def our_detections(detections, index: int) -> dict:
  valid = np.asarray(detections.valid[index])
  return dict(boxes=np.asarray(detections.boxes[index])[valid],
              scores=np.asarray(detections.scores[index])[valid],
              classes=np.asarray(detections.classes[index])[valid])
