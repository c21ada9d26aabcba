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
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory (scripts/convert_weights.py).")
flags.DEFINE_string("output", None, "Directory for the PNGs and JSON files.")
flags.DEFINE_integer("min_size", 800, "Short side after resizing.")
flags.DEFINE_integer("max_size", 1333, "Largest long side after resizing.")
flags.DEFINE_integer("size_divisible", 32, "Pad height and width to a multiple of this.")
flags.DEFINE_float("score_threshold", 0.05, "Keep detections scoring above this (torchvision: 0.05).")
flags.DEFINE_integer("max_detections", 100, "Detections per image at most.")
flags.DEFINE_float("draw_threshold", 0.5, "Draw detections scoring at least this.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
config_flags.DEFINE_config_file("config", None, "The training config, for a training run's "
                                "checkpoint (its data section also sets the resize defaults).")
flags.mark_flags_as_required(["checkpoint", "output"])


def read_image(path: str):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(path) as image:
    return np.array(image.convert("RGB"))


def find_label_map(checkpoint: str) -> str:
  """The run's label_map.json: in the checkpoint folder or up to three folders above it."""
  folder = os.path.abspath(checkpoint)
  for _ in range(4):
    candidate = os.path.join(folder, "label_map.json")
    if os.path.isfile(candidate):
      return candidate
    folder = os.path.dirname(folder)
  raise FileNotFoundError(f"no label_map.json in or above {checkpoint} (the training workdir has one)")


def image_id_for(path: str, position: int) -> int:
  stem = os.path.splitext(os.path.basename(path))[0]
  return int(stem) if stem.isdigit() else position


def detect_files(paths, *, checkpoint: str, output: str, min_size: int = 800, max_size: int = 1333,
                 size_divisible: int = 32, score_threshold: float = 0.05, max_detections: int = 100,
                 draw_threshold: float = 0.5, dtype: str = "float32", config=None) -> list[dict]:
  """Detects objects in the image files `paths`; writes PNGs and JSON to `output`; returns the COCO
  results. `checkpoint` is a converted checkpoint, or (with `config`, the run's training config) a
  training run's workdir or checkpoint folder."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from retinanet_jax import visualization, weights  # pylint: disable=import-outside-toplevel
  from retinanet_jax.models import preprocessing, retinanet  # pylint: disable=import-outside-toplevel

  if config is None:
    model, metadata = weights.restore_model(checkpoint, dtype=dtype)
    anchor_config = weights.anchor_config_from_metadata(metadata)
    category_ids = metadata["label_map"]["category_ids"]
    names = metadata["label_map"]["names"]
    convention = metadata["input_convention"]
  else:  # a training run's checkpoint: the config gives the network, the run its label map
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from retinanet_jax import evaluate  # pylint: disable=import-outside-toplevel
    from retinanet_jax.data import load_label_map  # pylint: disable=import-outside-toplevel

    loaded = evaluate.load_model(config, checkpoint,
                                 label_map=load_label_map(find_label_map(checkpoint)))
    model = nnx.merge(loaded.graphdef, loaded.params, loaded.rest)
    anchor_config, category_ids, names = loaded.anchor_config, loaded.category_ids, loaded.names
    convention = loaded.input_convention
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
  config = FLAGS.config
  if config is not None:  # the training geometry, unless given on the command line
    defaults = dict(min_size=config.data.eval_min_size, max_size=config.data.max_size,
                    size_divisible=config.data.pad_multiple)
    sizes = {k: v if FLAGS[k].present else defaults[k] for k, v in sizes.items()}
  detect_files(argv[1:], checkpoint=FLAGS.checkpoint, output=FLAGS.output, config=config, **sizes,
               score_threshold=FLAGS.score_threshold, max_detections=FLAGS.max_detections,
               draw_threshold=FLAGS.draw_threshold, dtype=FLAGS.dtype)


if __name__ == "__main__":
  app.run(main)
