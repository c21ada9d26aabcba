"""The input suite: our training input pipeline (benchmarks/input_data.py) at 640 LSJ and at
800/1333 against torchvision's detection-reference transforms (transforms.v2) on the same JPEGs, as
time per image and core."""

from __future__ import annotations

import time

from benchmarks.timing import Row, Session, Timing


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


def bench_input(session: Session) -> list[Row]:
  quick = session.options.quick  # one window per side; else ABBA twice, each for input_seconds
  import torch

  from benchmarks import input_data
  from retinanet_jax.data import transforms

  data_dir = session.options.data_dir
  seconds = 0.5 if quick else session.options.input_seconds
  batch_size = 4 if quick else 16
  rows = []
  for mode in ("lsj", "resize"):
    if quick:  # a tiny stand-in dataset (as tests/data/test_input_benchmark.py uses)
      config = input_data.benchmark_data_config(data_dir, mode=mode, num_images=8, height=72,
                                                width=96)
      config.image_size, config.max_size, config.train_min_size_range = 128, 160, (96, 96)
    else:
      config = input_data.benchmark_data_config(data_dir, mode=mode)
    padded_hw = transforms.padded_hw(transforms.TransformConfig.from_data_config(config))
    examples = _encoded_examples(config.name, data_dir)
    peer_batch = torchvision_input(
        examples, mode=mode, image_size=config.image_size, min_size=config.train_min_size_range[0],
        max_size=config.max_size, padded_hw=padded_hw, batch_size=batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a DataLoader worker: one process per core, one thread each
    ours, peer = [], []  # (images, wall seconds, CPU seconds of this process) per window
    try:
      # ABBA: ours, peer, peer, ours (x2), so that a change in the machine's load hits both sides.
      for side in ["ours", "peer"] if quick else ["ours", "peer", "peer", "ours"] * 2:
        if side == "ours":
          r = input_data.input_images_per_second(config, seconds=seconds, batch_size=batch_size,
                                                 warmup_batches=2)
          ours.append((r.images, r.seconds, r.cpu_seconds))
          continue
        peer_batch()
        images, wall, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall < seconds:
          images += len(peer_batch()[0])
        peer.append((images, time.perf_counter() - wall, time.process_time() - cpu))
    finally:
      torch.set_num_threads(threads)
    cores = input_data.host_cores()
    ours_images, ours_wall, ours_cpu = (sum(w[i] for w in ours) for i in range(3))
    peer_images, peer_wall, peer_cpu = (sum(w[i] for w in peer) for i in range(3))
    name = (f"LSJ {config.image_size} (scale 0.1-2.0, crop/pad, flip)" if mode == "lsj" else
            f"resize {config.train_min_size_range[0]}/{config.max_size} + flip")
    rows.append(Row(
        "input", f"input pipeline {name}, padded {padded_hw[0]}x{padded_hw[1]}: time per image "
        "and core", Timing(ours_wall * cores / ours_images, ours_cpu / ours_images),
        Timing(peer_wall / peer_images, peer_cpu / peer_images), 0.0,
        f"ours {ours_images / ours_wall / cores:.1f} images/s per core ({cores} cores, tf.data), "
        f"{ours_images / ours_cpu:.1f} per CPU-s; torchvision {peer_images / peer_wall:.1f} "
        f"images/s on 1 core, {peer_images / peer_cpu:.1f} per CPU-s; "
        f"{len(ours)} + {len(peer)} windows" + ("" if quick else " (ABBA)")))
  return rows
