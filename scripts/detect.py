"""Run a converted or trained RetinaNet on image files: PNGs with boxes, and COCO-format JSON.

    python scripts/detect.py --checkpoint=weights/tv_v2 --output=out photo1.jpg photo2.png

Preprocessing is torchvision's `GeneralizedRCNNTransform` at inference: resize (bilinear, float32) so
that the short side is --min_size (800) and the long side at most --max_size (1333), normalize, pad to a
multiple of --size_divisible (32, as torchvision; the training pipeline pads to 128). A model trained
with `data.mode='fixed'` (its description's geometry mode 'fixed', e.g. configs/sardet_r50.py) gets
every image stretched to its training side S x S instead, aspect ratio not kept, as in its training;
--min_size and --max_size do not apply to it. Boxes are mapped back to the image's pixels per axis in
float64 (x * w / w', y * h / h' for an image of h x w resized to h' x w'). Images are run one at a
time (a new size compiles once). Writes, in --output:
  * `<image stem>.detections.png`: the image with the detections scoring >= --draw_threshold and, at
    its top-left corner, the image's object count (below); two inputs
    with the same stem (`a/cat.png`, `b/cat.jpg`) get `cat.detections.png` and `cat-2.detections.png`;
  * `detections.json`: COCO results `[{image_id, category_id, category_name, bbox: [x, y, w, h], score,
    file_name}]` in original pixels, all detections >= --score_threshold;
  * `images.json`: `[{id, file_name, path, output_file, height, width, count, count_threshold}]`
    (`path` as given; `count`: the image's detections scoring >= --count_threshold, all classes: the
    object count of evaluation/counting.py; raise --max_detections above the densest image's count).
Image ids: when every input's file name is a number and no two are equal (COCO's 000000397133.jpg ->
397133), those numbers; otherwise each image's position on the command line (0, 1, ...). Ids are unique
in a run either way.

Nothing is ever overwritten: if one of the files to write already exists (an input image, or the output
of an earlier run in the same --output), the command stops before running the model and names them.
Library and backend INFO logging (Orbax, JAX's platform probe, TensorFlow) is off unless --verbose
(retinanet_jax/runtime/console.py). Expected failures end with one paragraph and an exit code (docs/failures.md, "Exit
codes"): a file to write exists (6), a missing or damaged checkpoint (4).
"""

import json
import os

from retinanet_jax.runtime import console  # (imports no JAX, no TensorFlow)

console.quiet_native_logs()

from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from retinanet_jax.runtime import errors  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted weights (scripts/convert_weights.py), a training "
                    "workdir, or one step's folder.")
flags.DEFINE_string("output", None, "Directory for the PNGs and JSON files.")
flags.DEFINE_integer("min_size", 800, "Short side after resizing (default: the training run's "
                     "evaluation size; 800 for converted weights). Not for a 'fixed' model (its "
                     "images are stretched to its training side).")
flags.DEFINE_integer("max_size", 1333, "Largest long side after resizing (default: as --min_size; "
                     "1333).")
flags.DEFINE_integer("size_divisible", 32, "Pad height and width to a multiple of this (default: "
                     "the run's pad multiple; 32).")
flags.DEFINE_float("score_threshold", 0.05, "Keep detections scoring above this (torchvision: 0.05).")
flags.DEFINE_integer("max_detections", 100, "Detections per image at most.")
flags.DEFINE_float("draw_threshold", 0.5, "Draw detections scoring at least this.")
flags.DEFINE_float("count_threshold", None, "Count detections scoring at least this (default: "
                   "--draw_threshold; a training run's evaluation reports the MAE-best "
                   "threshold as count_threshold).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
flags.DEFINE_bool("verbose", False, "Show the INFO logging of the checkpoint library and the "
                  "backends (off by default).")
flags.mark_flags_as_required(["checkpoint", "output"])

DETECTIONS_FILE, IMAGES_FILE = "detections.json", "images.json"


def read_image(path: str):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(path) as image:
    return np.array(image.convert("RGB"))


def image_ids(paths) -> list[int]:
  """One id per path, unique: the file names' numbers when all are distinct numbers, else positions."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
    return [int(s) for s in stems]
  return list(range(len(paths)))


def output_names(paths) -> list[str]:
  """`<stem>.detections.png` per path, with `-2`, `-3`, ... after the stem when a name repeats."""
  taken, names = set(), []
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = f"{stem}.detections.png", 1
    while name in taken:
      n += 1
      name = f"{stem}-{n}.detections.png"
    taken.add(name)
    names.append(name)
  return names


def check_outputs(paths, output: str, names) -> None:
  """Raises `FileExistsError` naming every file this run would overwrite (inputs included)."""
  targets = [os.path.join(output, n) for n in (*names, DETECTIONS_FILE, IMAGES_FILE)]
  inputs = {os.path.realpath(p) for p in paths}
  clashes = [t for t in targets if os.path.lexists(t) or os.path.realpath(t) in inputs]
  if clashes:
    raise FileExistsError(
        f"--output={output} already holds {len(clashes)} file(s) this run would write: "
        f"{', '.join(clashes)}; nothing was written. Give an empty or new --output directory "
        f"(detect.py never overwrites an input image or an earlier run's output).")


def detect_files(paths, *, checkpoint: str, output: str, min_size: int = 800, max_size: int = 1333,
                 size_divisible: int = 32, score_threshold: float = 0.05, max_detections: int = 100,
                 draw_threshold: float = 0.5, dtype: str = "float32",
                 count_threshold: float | None = None) -> list[dict]:
  """Detects objects in the image files `paths`; writes PNGs and JSON to `output` (see the module
  docstring; raises `FileExistsError` before any work if a file to write exists); returns the COCO
  results. `checkpoint`: converted weights, a training run's workdir or one of its step folders
  (`checkpoints.load_model`: the model description inside says everything). Each image's count is
  its detections scoring >= `count_threshold` (default: `draw_threshold`)."""
  paths = list(paths)
  names = output_names(paths)
  check_outputs(paths, output, names)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from retinanet_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from retinanet_jax.inference import visualization  # pylint: disable=import-outside-toplevel
  from retinanet_jax.checkpoints.model_description import Geometry  # pylint: disable=import-outside-toplevel
  from retinanet_jax.models import preprocessing, retinanet  # pylint: disable=import-outside-toplevel

  loaded = checkpoints.load_model(checkpoint, dtype=dtype)
  model = loaded.module()
  description = loaded.description
  geometry = description.geometry  # a 'fixed' model is stretched as in its training
  if geometry is None or geometry.mode != "fixed":
    geometry = Geometry(min_size=min_size, max_size=max_size, pad_multiple=size_divisible)
  anchor_config, convention = description.anchors, description.input_convention
  category_ids, names_of = description.label_map.category_ids, description.label_map.names
  os.makedirs(output, exist_ok=True)
  if count_threshold is None:
    count_threshold = draw_threshold
  results, images_info = [], []
  for path, image_id, name in zip(paths, image_ids(paths), names):
    original = read_image(path)
    height, width = original.shape[:2]
    size = geometry.resized_hw(height, width)
    resized = preprocessing.resize_bilinear(original, size)
    batch, image_hw = preprocessing.batch_images([resized], size_divisible=size_divisible)
    detections = jax.device_get(retinanet.detect(  # boxes in the resized image's pixels (scale 1)
        model, batch, image_hw, np.ones((1, 2), np.float32), anchor_config=anchor_config,
        convention=convention, score_threshold=score_threshold,
        max_detections=max_detections))
    valid = detections.valid[0]
    back = np.array([width / size[1], height / size[0]] * 2)  # per axis, float64
    boxes, scores = detections.boxes[0][valid].astype(np.float64) * back, detections.scores[0][valid]
    classes = detections.classes[0][valid]
    count = int(np.sum(scores >= count_threshold))
    images_info.append({"id": image_id, "file_name": os.path.basename(path), "path": path,
                        "output_file": name, "height": height, "width": width, "count": count,
                        "count_threshold": float(count_threshold)})
    for box, score, cls in zip(boxes.tolist(), scores.tolist(), classes.tolist()):
      results.append({"image_id": image_id, "category_id": int(category_ids[cls]),
                      "category_name": names_of[cls],
                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                      "score": float(score), "file_name": path})
    shown = scores >= draw_threshold
    picture = visualization.draw_detections(original, boxes[shown], classes[shown], scores[shown],
                                            names=names_of)
    visualization.draw_caption(picture, f"count: {count} (score >= {count_threshold:g})")
    with open(os.path.join(output, name), "xb") as f:  # "x": fails rather than overwrite
      picture.save(f, format="PNG")
    print(f"{path}: {len(scores)} detections, {int(shown.sum())} drawn, count {count} -> {name}")
  for file_name, obj in ((DETECTIONS_FILE, results), (IMAGES_FILE, images_info)):
    with open(os.path.join(output, file_name), "x") as f:
      json.dump(obj, f, indent=None if obj is results else 1)
  return results


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give at least one image file")
  console.setup(verbose=FLAGS.verbose)
  sizes = dict(min_size=FLAGS.min_size, max_size=FLAGS.max_size, size_divisible=FLAGS.size_divisible)
  from retinanet_jax import checkpoints  # pylint: disable=import-outside-toplevel
  geometry = checkpoints.locate(FLAGS.checkpoint).description.geometry
  if geometry is not None:  # a training run: its evaluation geometry, unless given here
    defaults = dict(min_size=geometry.min_size, max_size=geometry.max_size,
                    size_divisible=geometry.pad_multiple)
    sizes = {k: v if FLAGS[k].present else defaults[k] for k, v in sizes.items()}
    given = [f"--{k}" for k in ("min_size", "max_size") if FLAGS[k].present]
    if geometry.mode == "fixed" and given:
      raise app.UsageError(
          f"{FLAGS.checkpoint} was trained with every image stretched to {geometry.image_size} x "
          f"{geometry.image_size} (geometry mode 'fixed'): detect.py stretches images the same way, "
          f"and {' and '.join(given)} (the aspect-preserving resize) do not apply; leave them out")
  detect_files(argv[1:], checkpoint=FLAGS.checkpoint, output=FLAGS.output, **sizes,
               score_threshold=FLAGS.score_threshold, max_detections=FLAGS.max_detections,
               draw_threshold=FLAGS.draw_threshold, dtype=FLAGS.dtype,
               count_threshold=FLAGS.count_threshold)


if __name__ == "__main__":
  errors.run(main)
