"""Pictures of detections: boxes with class names and scores drawn on images (PIL), saved as PNG."""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Distinct, readable colours, cycled by class index.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
           (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128), (128, 128, 0))


def draw_detections(image: np.ndarray, boxes, classes, scores, *, names: Sequence[str],
                    scale: float = 1.0) -> Image.Image:
  """`image` uint8 `[H, W, 3]` with `boxes [N, 4]` (`[x1, y1, x2, y2]` pixels of `image`), contiguous
  `classes [N]` (indices into `names`) and `scores [N]` drawn on it, upscaled by `scale`."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  picture = Image.fromarray(image)
  if scale != 1.0:
    picture = picture.resize((round(image.shape[1] * scale), round(image.shape[0] * scale)),
                             Image.NEAREST)
  draw = ImageDraw.Draw(picture)
  for box, cls, score in zip(np.asarray(boxes, np.float64) * scale, classes, scores):
    colour = PALETTE[int(cls) % len(PALETTE)]
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
    label = f"{names[int(cls)]} {float(score):.2f}"
    left, top, right, bottom = draw.textbbox((x1, y1), label)
    draw.rectangle([x1, y1 - (bottom - top) - 2, x1 + (right - left) + 2, y1], fill=colour)
    draw.text((x1 + 1, y1 - (bottom - top) - 2), label, fill=(0, 0, 0))
  return picture


def grid(pictures: Sequence[Image.Image], *, columns: int = 4) -> Image.Image:
  """Pictures tiled left to right, top to bottom, on a white sheet."""
  if not pictures:
    raise ValueError("grid needs at least one picture")
  width = max(p.width for p in pictures)
  height = max(p.height for p in pictures)
  rows = -(-len(pictures) // columns)
  sheet = Image.new("RGB", (width * min(columns, len(pictures)), height * rows), (255, 255, 255))
  for i, p in enumerate(pictures):
    sheet.paste(p, ((i % columns) * width, (i // columns) * height))
  return sheet


def save_eval_examples(path: str, eval_input, detections: Sequence[dict], label_map, *,
                       num_images: int, score_threshold: float = 0.3, scale: float = 2.0) -> None:
  """A PNG grid of the first `num_images` evaluation images with their detections.

  `detections` are COCO results (original pixels, dataset category ids), as evaluation writes them;
  they are mapped onto the resized network input with each example's `scale`.
  """
  by_image = collections.defaultdict(list)
  for d in detections:
    if d["score"] >= score_threshold:
      by_image[d["image_id"]].append(d)
  pictures = []
  for batch in eval_input.numpy_batches():
    for i in np.nonzero(batch["example_mask"])[0]:
      if len(pictures) >= num_images:
        break
      h, w = (int(v) for v in batch["image_hw"][i])
      sy, sx = (float(v) for v in batch["scale"][i])
      dets = by_image.get(int(batch["image_id"][i]), [])
      boxes = np.array([[x * sx, y * sy, (x + bw) * sx, (y + bh) * sy]
                        for x, y, bw, bh in (d["bbox"] for d in dets)]).reshape(-1, 4)
      classes = [label_map.to_label(d["category_id"]) for d in dets]
      pictures.append(draw_detections(batch["image"][i][:h, :w], boxes, classes,
                                      [d["score"] for d in dets], names=label_map.names,
                                      scale=scale))
    if len(pictures) >= num_images:
      break
  grid(pictures).save(path)


def draw_caption(picture: Image.Image, text: str) -> Image.Image:
  """`picture` with `text` in black on a white band at its top-left corner (e.g. an object count)."""
  draw = ImageDraw.Draw(picture)
  left, top, right, bottom = draw.textbbox((2, 2), text)
  draw.rectangle([0, 0, right + 2, bottom + 2], fill=(255, 255, 255))
  draw.text((2, 2), text, fill=(0, 0, 0))
  return picture
