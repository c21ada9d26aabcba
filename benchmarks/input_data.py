"""Throughput of the training input pipeline on this host (images/s, and per host core).

`input_images_per_second(data_config, seconds=...)` times `TrainInput.next_numpy()` (everything the
host does: read, shuffle, decode, augment, pad, batch) after a warm-up, without device transfer. It
reports wall-clock images/s (and that divided by the host's cores) and images per CPU-second of this
process (all its threads): the per-core cost, which stays meaningful on a busy machine.
`benchmark_data_config(data_dir, mode=...)` gives a config over a COCO-like stand-in dataset built
once in `data_dir` (640x480 JPEGs of ~150 KB, textured and noisy like photographs, 1-6 objects),
for machines without COCO; pass a real COCO config to measure COCO itself.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time

import ml_collections
import numpy as np
from PIL import Image

from retinanet_jax.data import coco_format, config as config_lib, pipeline, synthetic

BENCHMARK_TFDS_NAME = "retinanet_input_benchmark"


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
  images: int
  seconds: float
  images_per_second: float
  cores: int
  images_per_second_per_core: float  # wall-clock rate / cores
  cpu_seconds: float  # CPU time of this process (all threads) while timing
  images_per_cpu_second: float


def host_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def input_images_per_second(data_config: ml_collections.ConfigDict, *, seconds: float = 10.0,
                            batch_size: int = 16, warmup_batches: int = 5) -> BenchmarkResult:
  """Training-pipeline images/s on this host for `data_config` (one process, no devices)."""
  train_input = pipeline.make_train_input(data_config, global_batch_size=batch_size, mesh=None,
                                          process_index=0, process_count=1)
  for _ in range(warmup_batches):
    train_input.next_numpy()
  images, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    images += len(train_input.next_numpy()["image"])
  elapsed = time.perf_counter() - start
  cpu = time.process_time() - cpu_start
  cores = host_cores()
  return BenchmarkResult(images, elapsed, images / elapsed, cores, images / elapsed / cores, cpu,
                         images / max(cpu, 1e-9))


def _coco_like_image(rng: np.random.Generator, height: int, width: int):
  """A 'photograph': synthetic shapes on a texture, plus fine detail so JPEG sizes are realistic."""
  cfg = synthetic.SyntheticConfig(image_size=max(height, width), min_object_size=16,
                                  texture_strength=60.0, noise_std=10.0)
  image, boxes, labels = synthetic.render_image(rng, cfg)
  image, boxes = image[:height, :width], np.minimum(boxes, [width, height, width, height])
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return image, boxes[keep], labels[keep]


def build_benchmark_dataset(data_dir: str, *, num_images: int = 128, height: int = 480,
                            width: int = 640, seed: int = 0) -> str:
  """Builds (once) the COCO-like stand-in dataset in data_dir; returns its TFDS name."""
  name = BENCHMARK_TFDS_NAME
  config = f"h{height}_w{width}_n{num_images}_s{seed}"
  target = os.path.join(data_dir, name, config, coco_format.VERSION, "dataset_info.json")
  if os.path.exists(target):
    return f"{name}/{config}"
  images, annotations, encoded = [], [], {}
  for i in range(num_images):
    image, boxes, labels = _coco_like_image(np.random.default_rng([seed, i]), height, width)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    encoded[i + 1] = buffer.getvalue()
    images.append({"id": i + 1, "file_name": f"{i + 1}.jpg", "height": height, "width": width})
    for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
      annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                          "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                          "iscrowd": 0})
  categories = [{"id": k + 1, "name": f"class_{k}"} for k in range(8)]
  source = coco_format.SplitSource(
      {"images": images, "annotations": annotations, "categories": categories},
      lambda record: encoded[record["id"]])
  coco_format.build_tfds_dataset(name, {"train": source}, data_dir=data_dir, config=config,
                                 strict=True, description="input pipeline benchmark")
  return f"{name}/{config}"


def benchmark_data_config(data_dir: str, *, mode: str, num_images: int = 128, height: int = 480,
                          width: int = 640) -> ml_collections.ConfigDict:
  """The config of the issue's two measurements over the stand-in dataset.

  mode "lsj": 640x640 large-scale jitter (0.1-2.0), flip. mode "resize": short side 800, long side
  at most 1333 (padded to 1408x1408), flip. num_images, height, width: the stand-in dataset's size
  (`build_benchmark_dataset`; smaller for smoke tests).
  """
  c = config_lib.default_data_config()
  c.name = build_benchmark_dataset(data_dir, num_images=num_images, height=height, width=width)
  c.data_dir = data_dir
  c.mode = mode
  c.image_size = 640
  c.scale_range = (0.1, 2.0)
  c.train_min_size_range = (800, 800)
  c.max_size = 1333
  c.shuffle_buffer = 64
  return c
