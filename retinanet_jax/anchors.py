"""RetinaNet anchors for a static image size, built once with NumPy.

For each pyramid level `l` in `min_level..max_level` (P3-P7 by default, nominal stride `2**l`) and each
feature-map cell, `num_scales * len(aspect_ratios)` anchors (9 by default) of base size
`anchor_scale * 2**l` (4 x stride: 32 px on P3 ... 512 px on P7), scaled by `2**(k / num_scales)` for
`k = 0..num_scales-1` and reshaped to height/width ratio `r` (area kept: `h = s * sqrt(r)`,
`w = s / sqrt(r)`).

Order of the `[A, 4]` result: level, then row, then column, then anchor-within-location, and within a
location **aspect-ratio-major** (`a = ratio_index * num_scales + scale_index`), as torchvision's
`AnchorGenerator`. The network's heads emit their outputs in this same order (docs/design.md).

Feature-map size of level `l` is `ceil(H / 2**l)` rows by `ceil(W / 2**l)` columns: what a chain of
stride-2, padding-1 convolutions produces for an input of any size.

The conventions that differ between reference implementations are one named option, `convention`:

| convention    | anchor sizes                          | base anchors | centres / stride                     |
|---------------|---------------------------------------|--------------|--------------------------------------|
| `torchvision` | `int(s * 2**(k/3))` (32, 40, 50, ...) | rounded      | `i * stride`, stride = `size // grid` |
| `detectron2`  | `s * 2**(k/3)` (float)                | exact        | `i * stride`, stride = `2**l` (offset 0) |
| `tf`          | `s * 2**(k/3)` (float)                | exact        | `(i + 0.5) * stride`, stride = `2**l` |

`torchvision` is the default so that imported torchvision weights reproduce exactly. Note that its
stride is the integer quotient of the image size by the grid size, which equals `2**l` only when the
image size is a multiple of `2**l` (the training pipeline pads to multiples of 128, where all three agree
on strides).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

CONVENTIONS = ("torchvision", "detectron2", "tf")


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Hyper-parameters of the anchor grid (defaults: the paper's and all reference implementations')."""

  min_level: int = 3
  max_level: int = 7
  num_scales: int = 3
  aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
  anchor_scale: float = 4.0  # base anchor size = anchor_scale * stride
  convention: str = dataclasses.field(default="torchvision", metadata={"choices": CONVENTIONS})

  def __post_init__(self):
    if self.convention not in CONVENTIONS:
      raise ValueError(f"anchor convention must be one of {CONVENTIONS}, got {self.convention!r}")
    if not 1 <= self.min_level <= self.max_level:
      raise ValueError(
          f"need 1 <= min_level <= max_level, got min_level={self.min_level}, max_level={self.max_level}")
    if self.num_scales < 1:
      raise ValueError(f"num_scales must be >= 1, got {self.num_scales}")
    if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
      raise ValueError(f"aspect_ratios must be positive numbers, got {self.aspect_ratios}")
    if self.anchor_scale <= 0:
      raise ValueError(f"anchor_scale must be positive, got {self.anchor_scale}")

  @property
  def num_per_location(self) -> int:
    return self.num_scales * len(self.aspect_ratios)

  def sizes(self, level: int) -> list[float]:
    """The `num_scales` anchor sizes (sqrt of area, pixels) of `level` under this convention."""
    base = self.anchor_scale * 2**level
    sizes = [base * 2 ** (k / self.num_scales) for k in range(self.num_scales)]
    if self.convention == "torchvision":
      sizes = [float(int(s)) for s in sizes]
    return sizes


@dataclasses.dataclass(frozen=True, eq=False)
class AnchorSet:
  """Anchors of one image size.

  Attributes:
    boxes: float32 `[A, 4]`, `[x1, y1, x2, y2]` pixels, in the order of the module docstring.
    image_size: `(H, W)` the anchors were built for.
    level_shapes: `(h, w)` feature-map size per level, `min_level` first.
    level_strides: `(stride_y, stride_x)` per level as used for the centres.
    num_per_location: anchors per feature-map cell.
  """

  boxes: np.ndarray
  image_size: tuple[int, int]
  level_shapes: tuple[tuple[int, int], ...]
  level_strides: tuple[tuple[int, int], ...]
  num_per_location: int

  @property
  def level_counts(self) -> tuple[int, ...]:
    """Anchors per level: `h * w * num_per_location`."""
    return tuple(h * w * self.num_per_location for h, w in self.level_shapes)

  @property
  def level_offsets(self) -> tuple[int, ...]:
    """Index of each level's first anchor in `boxes` (len = levels + 1, last = A)."""
    return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.level_counts)]))

  @property
  def num_anchors(self) -> int:
    return int(self.boxes.shape[0])


def cell_anchors(level: int, *, config: AnchorConfig) -> np.ndarray:
  """The `num_per_location` anchors `[n, 4]` of one cell of `level`, centred at (0, 0), ratio-major."""
  sizes = np.asarray(config.sizes(level), dtype=np.float32)
  ratios = np.asarray(config.aspect_ratios, dtype=np.float32)
  if config.convention == "torchvision":
    # float32 arithmetic and rounding exactly as torchvision's AnchorGenerator.generate_anchors.
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)).astype(np.float32)
  sizes64 = np.asarray(config.sizes(level), dtype=np.float64)
  ratios64 = np.asarray(config.aspect_ratios, dtype=np.float64)
  ws = (sizes64[None, :] / np.sqrt(ratios64)[:, None]).reshape(-1)
  hs = (sizes64[None, :] * np.sqrt(ratios64)[:, None]).reshape(-1)
  return (np.stack([-ws, -hs, ws, hs], axis=1) / 2).astype(np.float32)


def feature_shape(image_size: tuple[int, int], level: int) -> tuple[int, int]:
  """`(ceil(H / 2**level), ceil(W / 2**level))`: the size of pyramid level `level`."""
  height, width = image_size
  return (-(-height // 2**level), -(-width // 2**level))


def generate_anchors(image_size, *, config: AnchorConfig = AnchorConfig()) -> AnchorSet:
  """All anchors of an image of `image_size = (H, W)` pixels (the padded network input).

  Returns an `AnchorSet` whose `boxes` are float32 `[A, 4]`, `[x1, y1, x2, y2]` pixels. The result is
  a NumPy constant: build it once per image size, outside `jit`.
  """
  if len(image_size) != 2 or any(int(s) != s or s < 1 for s in image_size):
    raise ValueError(f"image_size must be (height, width) positive integers, got {image_size}")
  height, width = int(image_size[0]), int(image_size[1])
  shapes, strides, per_level = [], [], []
  for level in range(config.min_level, config.max_level + 1):
    grid_h, grid_w = feature_shape((height, width), level)
    if config.convention == "torchvision":
      stride_y, stride_x = height // grid_h, width // grid_w
      offset = 0.0
    else:
      stride_y = stride_x = 2**level
      offset = 0.5 if config.convention == "tf" else 0.0
    shift_x = ((np.arange(grid_w, dtype=np.float32) + offset) * stride_x).astype(np.float32)
    shift_y = ((np.arange(grid_h, dtype=np.float32) + offset) * stride_y).astype(np.float32)
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)
    per_level.append((shifts + cell_anchors(level, config=config)[None]).reshape(-1, 4))
    shapes.append((grid_h, grid_w))
    strides.append((stride_y, stride_x))
  boxes = np.concatenate(per_level, axis=0).astype(np.float32)
  boxes.setflags(write=False)
  return AnchorSet(boxes=boxes, image_size=(height, width), level_shapes=tuple(shapes),
                   level_strides=tuple(strides), num_per_location=config.num_per_location)


def num_anchors(image_size, *, config: AnchorConfig = AnchorConfig()) -> int:
  """`A` for `image_size` without building the boxes (e.g. 76,725 for 640x640 with the defaults)."""
  return sum(math.prod(feature_shape(image_size, level)) * config.num_per_location
             for level in range(config.min_level, config.max_level + 1))
