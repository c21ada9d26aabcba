"""A built-in synthetic detection dataset: coloured shapes on textured, noisy backgrounds.

Each foreground class is one shape drawn in one colour (class k: `SHAPES[k]` in `COLOURS[k]`, with
per-object colour jitter and shading). Objects range from `min_object_size` (8 px) to
`max_object_fraction` of the image side with a log-uniform size distribution, so most are smaller
than 32 px; they overlap and occlude each other (an object stays at least `min_visible` visible);
backgrounds are smooth random colour fields plus pixel noise; distractors (lines, grey blobs) are not
objects; a fraction of images have no objects at all. Boxes are the tight boxes of the drawn pixels
(visible or not, like an amodal annotation of the whole shape).

Everything is a function of `SyntheticConfig` (seeded NumPy, one generator per image), so the same
config always gives the same bytes. The dataset is stored as a TFDS dataset through the same code as
any COCO-format dataset (`coco_format.build_tfds_dataset`): `make_coco_splits` returns COCO-format
dicts plus encoded images, `ensure_synthetic_dataset` (in `sources.py`) builds it on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import ml_collections
import numpy as np
from PIL import Image

SHAPES = ("square", "circle", "triangle", "cross", "ring", "diamond", "bowtie", "frame")
COLOURS = (
    (220, 45, 45),    # red
    (40, 175, 65),    # green
    (50, 85, 230),    # blue
    (235, 205, 40),   # yellow
    (205, 60, 205),   # magenta
    (40, 200, 215),   # cyan
    (245, 135, 30),   # orange
    (245, 245, 245),  # white
)
SPLITS = ("train", "validation")
# "scattered": the default (objects at random places, overlapping, occluding). "dense": shelves of
# small objects side by side (SKU-110K-like: hundreds per image, neighbours touching).
LAYOUTS = ("scattered", "dense")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size and difficulty knobs of the synthetic dataset.

  Attributes:
    image_size: side of the square images, pixels.
    num_train: training images.
    num_validation: validation images.
    seed: master seed; each image has its own generator seeded by (seed, split, index).
    num_classes: foreground classes, 6..8 (the first `num_classes` of SHAPES/COLOURS).
    min_objects: objects per non-empty image, lower bound.
    max_objects: objects per non-empty image, upper bound.
    background_only_fraction: probability that an image has no object.
    min_object_size: smallest object side, pixels.
    max_object_fraction: largest object side as a fraction of image_size.
    aspect_ratio_range: width / height of an object's box, log-uniform in this range.
    min_visible: an object keeps at least this fraction of its pixels visible after occlusion.
    max_distractors: up to this many lines and grey blobs per image.
    texture_strength: amplitude (0-255 scale) of the smooth random background field.
    noise_std: standard deviation of the per-pixel Gaussian noise over the whole image.
    colour_jitter: per-object uniform RGB offset in [-colour_jitter, colour_jitter].
    class_colours: True: class k is always COLOURS[k] (shape and colour both identify it); False:
      random colours (only the shape identifies the class: harder).
    jpeg_quality: JPEG quality of the stored images.
    layout: "scattered" (the default dataset) or "dense": the image is filled with shelves (rows of
      random height) of objects packed side by side, each touching or within `dense_gap` pixels of
      its neighbours, up to `max_objects` per image (min_objects, min_visible and
      background_only_fraction do not apply). Object sides are drawn uniformly from
      [min_object_size, max_object_fraction * image_size].
    dense_gap: dense layout: the largest gap in pixels between neighbouring objects and shelves
      (each gap is uniform in [0, dense_gap]; 0: every object touches its neighbours).
  """

  image_size: int = 128
  num_train: int = 3000
  num_validation: int = 300
  seed: int = 0
  num_classes: int = 6
  min_objects: int = 1
  max_objects: int = 6
  background_only_fraction: float = 0.08
  min_object_size: float = 8.0
  max_object_fraction: float = 0.75
  aspect_ratio_range: tuple[float, float] = (0.7, 1.4)
  min_visible: float = 0.5
  max_distractors: int = 4
  texture_strength: float = 40.0
  noise_std: float = 8.0
  colour_jitter: float = 25.0
  class_colours: bool = True
  jpeg_quality: int = 95
  layout: str = dataclasses.field(default="scattered", metadata={"choices": LAYOUTS})
  dense_gap: float = 1.0

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
    if self.dense_gap < 0:
      raise ValueError(f"dense_gap must be >= 0, got {self.dense_gap}")
    if not 6 <= self.num_classes <= len(SHAPES):
      raise ValueError(f"num_classes must be in 6..{len(SHAPES)}, got {self.num_classes}")
    if not 1 <= self.min_objects <= self.max_objects:
      raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, "
                       f"{self.max_objects}")
    if self.min_object_size >= self.max_object_fraction * self.image_size:
      raise ValueError(f"min_object_size {self.min_object_size} must be below "
                       f"max_object_fraction * image_size = "
                       f"{self.max_object_fraction * self.image_size}")

  def to_config_dict(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(self))

  @classmethod
  def from_config(cls, config) -> "SyntheticConfig":
    """From a ConfigDict or dict with (a subset of) the fields, or a `SyntheticConfig`."""
    if isinstance(config, cls):
      return config
    values = dict(config)
    if "aspect_ratio_range" in values:
      values["aspect_ratio_range"] = tuple(values["aspect_ratio_range"])
    return cls(**values)

  def fingerprint(self) -> str:
    """Short hash of every field: a changed knob names a different TFDS dataset."""
    fields = dataclasses.asdict(self)
    if self.layout == "scattered":  # fields added with the dense layout: the old names stay valid
      del fields["layout"], fields["dense_gap"]
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def label_names(config: SyntheticConfig) -> tuple[str, ...]:
  if config.class_colours:
    return tuple(f"{colour}_{shape}" for shape, colour in zip(
        SHAPES[:config.num_classes],
        ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")))
  return SHAPES[:config.num_classes]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask of `shape` (one of `SHAPES`) at normalized coordinates u (x), v (y), which are in
  [-1, 1] inside the shape's box (any array shape; the result has the broadcast shape)."""
  au, av = np.abs(u), np.abs(v)
  if shape == "square":
    return (au <= 1) & (av <= 1)
  if shape == "circle":
    return u * u + v * v <= 1
  if shape == "triangle":  # apex at the top
    return (av <= 1) & (au <= (v + 1) / 2)
  if shape == "cross":
    return (au <= 1) & (av <= 1) & ((au <= 0.33) | (av <= 0.33))
  if shape == "ring":
    r2 = u * u + v * v
    return (r2 <= 1) & (r2 >= 0.55 ** 2)
  if shape == "diamond":
    return au + av <= 1
  if shape == "bowtie":
    return (au <= 1) & (av <= au)
  if shape == "frame":
    return (au <= 1) & (av <= 1) & (np.maximum(au, av) >= 0.6)
  raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, config: SyntheticConfig) -> np.ndarray:
  """Smooth random colour field, float32 [S, S, 3] in 0..255."""
  size = config.image_size
  base = rng.uniform(60, 190) + rng.uniform(-20, 20, size=3)
  cells = int(rng.integers(2, 9))
  coarse = rng.normal(0, 1, size=(cells, cells, 3))
  coarse = (coarse - coarse.min()) / max(np.ptp(coarse), 1e-6) * 255
  field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size),
                                                                     Image.BICUBIC), np.float32)
  return base + (field - 127.5) / 127.5 * config.texture_strength


def _draw_distractors(rng, image: np.ndarray, config: SyntheticConfig) -> None:
  size = config.image_size
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  for _ in range(int(rng.integers(0, config.max_distractors + 1))):
    grey = rng.uniform(30, 230)
    colour = grey + rng.uniform(-12, 12, size=3)
    if rng.random() < 0.5:  # a line segment, 1-2.5 px thick
      p0, p1 = rng.uniform(0, size, size=2), rng.uniform(0, size, size=2)
      d = p1 - p0
      t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
      dist = np.hypot(xx - p0[0] - t * d[0], yy - p0[1] - t * d[1])
      mask = dist <= rng.uniform(0.5, 1.25)
    else:  # a grey ellipse blob with soft random radii
      c = rng.uniform(0, size, size=2)
      r = rng.uniform(3, size / 5, size=2)
      mask = ((xx - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 <= 1
    image[mask] = colour


def _sample_object(rng, config: SyntheticConfig):
  """Returns (label, (x0, y0, w, h) float extent, colour)."""
  size = config.image_size
  label = int(rng.integers(config.num_classes))
  lo, hi = np.log(config.min_object_size), np.log(config.max_object_fraction * size)
  side = float(np.exp(rng.uniform(lo, hi)))
  ratio = float(np.exp(rng.uniform(*np.log(config.aspect_ratio_range))))
  w, h = side * np.sqrt(ratio), side / np.sqrt(ratio)
  w = float(np.clip(w, config.min_object_size, size))
  h = float(np.clip(h, config.min_object_size, size))
  x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
  if config.class_colours:
    colour = np.asarray(COLOURS[label], np.float32)
  else:
    colour = rng.uniform(0, 255, size=3).astype(np.float32)
  colour = colour + rng.uniform(-config.colour_jitter, config.colour_jitter, size=3)
  return label, (x0, y0, w, h), colour


def _render_dense(rng: np.random.Generator, config: SyntheticConfig):
  """The dense layout (SyntheticConfig.layout): shelves of touching objects; see render_image."""
  size = config.image_size
  image = _background(rng, config)
  _draw_distractors(rng, image, config)
  lo, hi = config.min_object_size, config.max_object_fraction * size
  boxes, labels = [], []
  y = float(rng.uniform(0, config.dense_gap + 1))
  while len(boxes) < config.max_objects:
    row_h = float(rng.uniform(lo, hi))
    if y + row_h > size:
      break
    x = float(rng.uniform(0, config.dense_gap + 1))
    while len(boxes) < config.max_objects:
      w = float(rng.uniform(lo, hi))
      h = float(np.clip(row_h * rng.uniform(0.8, 1.0), lo, row_h))
      if x + w > size:
        break
      label, _, colour = _sample_object(rng, config)
      y0 = y + row_h - h  # standing on the shelf
      c0, c1 = int(np.floor(x)), int(np.ceil(x + w))
      r0, r1 = int(np.floor(y0)), int(np.ceil(y0 + h))
      yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32) + 0.5
      u, v = (xx - x) / w * 2 - 1, (yy - y0) / h * 2 - 1
      mask = shape_mask(SHAPES[label], u, v)
      if mask.sum() >= 4:
        shade = 1 + 0.15 * (u * rng.uniform(-1, 1) + v * rng.uniform(-1, 1))
        patch = image[r0:r1, c0:c1]
        patch[mask] = colour[None, :] * shade[mask][:, None]
        rows, cols = np.nonzero(mask)
        boxes.append([c0 + cols.min(), r0 + rows.min(), c0 + cols.max() + 1, r0 + rows.max() + 1])
        labels.append(label)
      x += w + float(rng.uniform(0, config.dense_gap))
    y += row_h + float(rng.uniform(0, config.dense_gap))
  image = image + rng.normal(0, config.noise_std, size=image.shape)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return (image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32))


def render_image(rng: np.random.Generator, config: SyntheticConfig):
  """Draws one image (`config.layout`: scattered objects, or dense shelves of them).

  Returns:
    image: uint8 [S, S, 3].
    boxes: float32 [N, 4], [x1, y1, x2, y2] pixels, tight around each object's drawn pixels.
    labels: int32 [N] in 0..num_classes-1.
  """
  if config.layout == "dense":
    return _render_dense(rng, config)
  size = config.image_size
  image = _background(rng, config)
  _draw_distractors(rng, image, config)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

  visible: list[np.ndarray] = []  # per placed object, its pixels not covered by later ones
  full_areas: list[int] = []
  boxes, labels = [], []
  num_objects = 0
  if rng.random() >= config.background_only_fraction:
    num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
  for _ in range(num_objects):
    for _attempt in range(20):
      label, (x0, y0, w, h), colour = _sample_object(rng, config)
      u = (xx - x0) / w * 2 - 1
      v = (yy - y0) / h * 2 - 1
      mask = shape_mask(SHAPES[label], u, v)
      area = int(mask.sum())
      # Every earlier object keeps at least min_visible of its pixels once this one covers it.
      if area >= 4 and all((vis & ~mask).sum() >= config.min_visible * full
                           for vis, full in zip(visible, full_areas)):
        break
    else:
      continue  # no placement found: fewer objects in this image
    shade = 1 + 0.15 * (u * rng.uniform(-1, 1) + v * rng.uniform(-1, 1))
    image[mask] = colour[None, :] * shade[mask][:, None]
    visible = [vis & ~mask for vis in visible] + [mask]
    full_areas.append(area)
    rows, cols = np.nonzero(mask)
    boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    labels.append(label)
  image = image + rng.normal(0, config.noise_std, size=image.shape)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return (image, np.asarray(boxes, np.float32).reshape(-1, 4),
          np.asarray(labels, np.int32))


def make_coco_splits(config: SyntheticConfig) -> dict[str, tuple[dict, dict[int, bytes]]]:
  """Renders every image: split -> (COCO-format dict, image id -> JPEG bytes).

  Image ids are 1..num_train for train and 1..num_validation for validation; category ids are
  1..num_classes.
  """
  names = label_names(config)
  categories = [{"id": k + 1, "name": name} for k, name in enumerate(names)]
  result = {}
  for split_index, (split, count) in enumerate(
      zip(SPLITS, (config.num_train, config.num_validation))):
    images, annotations, encoded = [], [], {}
    for i in range(count):
      rng = np.random.default_rng([config.seed, split_index, i])
      image, boxes, labels = render_image(rng, config)
      image_id = i + 1
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format="JPEG", quality=config.jpeg_quality)
      encoded[image_id] = buffer.getvalue()
      images.append({"id": image_id, "file_name": f"{split}_{image_id:06d}.jpg",
                     "width": config.image_size, "height": config.image_size})
      for box, label in zip(boxes.tolist(), labels.tolist()):
        x1, y1, x2, y2 = box
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    result[split] = ({"images": images, "annotations": annotations, "categories": categories},
                     encoded)
  return result
