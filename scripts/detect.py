"""Run a converted or trained RetinaNet on image files: PNGs with boxes, and COCO-format JSON.

    python scripts/detect.py --checkpoint=weights/tv_v2 --output=out photo1.jpg photo2.png

Preprocessing is torchvision's `GeneralizedRCNNTransform` at inference: resize (bilinear, float32) so
that the short side is --min_size (800) and the long side at most --max_size (1333), normalize, pad to a
multiple of --size_divisible (32, as torchvision; the training pipeline pads to 128). Images are run one
at a time (a new size compiles once). Writes, in --output:
  * `<image name>.png`: the image with the detections scoring >= --draw_threshold;
  * `detections.json`: COCO results `[{image_id, category_id, bbox: [x, y, w, h], score}]` in original
    pixels, all detections >= --score_threshold; `image_id` is the file name's number when it is one
    (COCO's 000000397133.jpg -> 397133), else the image's position on the command line;
  * `images.json`: `[{id, file_name, height, width}]`.
"""

import json
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted weights (scripts/convert_weights.py), a training "
                    "workdir, or one step's folder.")
flags.DEFINE_string("output", None, "Directory for the PNGs and JSON files.")
flags.DEFINE_integer("min_size", 800, "Short side after resizing (default: the training run's "
                     "evaluation size; 800 for converted weights).")
flags.DEFINE_integer("max_size", 1333, "Largest long side after resizing (default: as --min_size; "
                     "1333).")
flags.DEFINE_integer("size_divisible", 32, "Pad height and width to a multiple of this (default: "
                     "the run's pad multiple; 32).")
flags.DEFINE_float("score_threshold", 0.05, "Keep detections scoring above this (torchvision: 0.05).")
flags.DEFINE_integer("max_detections", 100, "Detections per image at most.")
flags.DEFINE_float("draw_threshold", 0.5, "Draw detections scoring at least this.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
flags.mark_flags_as_required(["checkpoint", "output"])


def read_image(path: str):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(path) as image:
    return np.array(image.convert("RGB"))


def image_id_for(path: str, position: int) -> int:
  stem = os.path.splitext(os.path.basename(path))[0]
  return int(stem) if stem.isdigit() else position


def detect_files(paths, *, checkpoint: str, output: str, min_size: int = 800, max_size: int = 1333,
                 size_divisible: int = 32, score_threshold: float = 0.05, max_detections: int = 100,
                 draw_threshold: float = 0.5, dtype: str = "float32") -> list[dict]:
  """Detects objects in the image files `paths`; writes PNGs and JSON to `output`; returns the COCO
  results. `checkpoint`: converted weights, a training run's workdir or one of its step folders
  (`checkpoints.load_model`: the model description inside says everything)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from retinanet_jax import checkpoints, visualization  # pylint: disable=import-outside-toplevel
  from retinanet_jax.models import preprocessing, retinanet  # pylint: disable=import-outside-toplevel

  loaded = checkpoints.load_model(checkpoint, dtype=dtype)
  model = loaded.module()
  description = loaded.description
  anchor_config, convention = description.anchors, description.input_convention
  category_ids, names = description.label_map.category_ids, description.label_map.names
  os.makedirs(output, exist_ok=True)
  results, images_info = [], []
  for position, path in enumerate(paths):
    original = read_image(path)
    height, width = original.shape[:2]
    size = preprocessing.torchvision_resized_size(height, width, min_size=min_size,
                                                  max_size=max_size)
    resized = preprocessing.resize_bilinear(original, size)
    batch, image_hw = preprocessing.batch_images([resized], size_divisible=size_divisible)
    scale = np.array([[size[0] / height, size[1] / width]], np.float32)
    detections = jax.device_get(retinanet.detect(
        model, batch, image_hw, scale, anchor_config=anchor_config,
        convention=convention, score_threshold=score_threshold,
        max_detections=max_detections))
    valid = detections.valid[0]
    boxes, scores = detections.boxes[0][valid], detections.scores[0][valid]
    classes = detections.classes[0][valid]
    image_id = image_id_for(path, position)
    images_info.append({"id": image_id, "file_name": os.path.basename(path), "height": height,
                        "width": width})
    for box, score, cls in zip(boxes.tolist(), scores.tolist(), classes.tolist()):
      results.append({"image_id": image_id, "category_id": int(category_ids[cls]),
                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                      "score": float(score)})
    shown = scores >= draw_threshold
    picture = visualization.draw_detections(original, boxes[shown], classes[shown], scores[shown],
                                            names=names)
    picture.save(os.path.join(output, os.path.splitext(os.path.basename(path))[0] + ".png"))
    print(f"{path}: {len(scores)} detections, {int(shown.sum())} drawn")
  with open(os.path.join(output, "detections.json"), "w") as f:
    json.dump(results, f)
  with open(os.path.join(output, "images.json"), "w") as f:
    json.dump(images_info, f, indent=1)
  return results


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give at least one image file")
  sizes = dict(min_size=FLAGS.min_size, max_size=FLAGS.max_size, size_divisible=FLAGS.size_divisible)
  from retinanet_jax import checkpoints  # pylint: disable=import-outside-toplevel
  geometry = checkpoints.locate(FLAGS.checkpoint).description.geometry
  if geometry is not None:  # a training run: its evaluation geometry, unless given here
    defaults = dict(min_size=geometry.min_size, max_size=geometry.max_size,
                    size_divisible=geometry.pad_multiple)
    sizes = {k: v if FLAGS[k].present else defaults[k] for k, v in sizes.items()}
  detect_files(argv[1:], checkpoint=FLAGS.checkpoint, output=FLAGS.output, **sizes,
               score_threshold=FLAGS.score_threshold, max_detections=FLAGS.max_detections,
               draw_threshold=FLAGS.draw_threshold, dtype=FLAGS.dtype)


if __name__ == "__main__":
  app.run(main)
