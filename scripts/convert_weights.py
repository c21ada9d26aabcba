"""Convert a torchvision or detectron2 checkpoint into a retinanet_jax checkpoint directory.

    # torchvision COCO RetinaNet v1 / v2 (.pth), keeping the 91 category-id-indexed classes:
    python scripts/convert_weights.py --source=torchvision_v1 \
        --input=retinanet_resnet50_fpn_coco-eeacb38b.pth --output=weights/tv_v1
    # ... or sliced to the 80 contiguous COCO classes (the data pipeline's labels):
    python scripts/convert_weights.py --source=torchvision_v2 --class_mapping=coco80 \
        --input=retinanet_resnet50_fpn_v2_coco-5905b1c5.pth --output=weights/tv_v2_coco80
    # ImageNet backbones for training (config.init_from, config.init_mode='backbone'):
    python scripts/convert_weights.py --source=torchvision_backbone --backbone=resnet50 \
        --input=resnet50-0676ba61.pth --output=weights/r50_imagenet
    python scripts/convert_weights.py --source=msra_backbone --backbone=resnet50 \
        --input=R-50.pkl --output=weights/r50_msra
    # detectron2 model zoo (.pkl): R50 / R101 / X101 RetinaNet
    python scripts/convert_weights.py --source=detectron2 --backbone=resnet101 \
        --input=model_final_59f53c.pkl --output=weights/d2_r101

The output directory holds the Orbax model state (`model/`) and description.json (architecture,
anchors, input convention, label map with names), the same description a training run's checkpoints
carry; scripts/evaluate.py and scripts/detect.py read it alone (retinanet_jax/checkpoints/). torch is needed for .pth inputs only.
"""

import json

from absl import app, flags

from retinanet_jax.runtime import errors
from retinanet_jax.checkpoints import weights
from retinanet_jax.models import resnet

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", None, weights.SOURCES, "Kind of checkpoint (retinanet_jax/checkpoints/weights.py).")
flags.DEFINE_string("input", None, "The .pth or .pkl file.")
flags.DEFINE_string("output", None, "Directory to write.")
flags.DEFINE_enum("backbone", "resnet50", sorted(resnet.ARCHITECTURES), "Backbone architecture.")
flags.DEFINE_enum("class_mapping", "keep", weights.CLASS_MAPPINGS,
                  "torchvision detection heads: 'keep' the 91 COCO-id-indexed outputs, or 'coco80'.")
flags.DEFINE_float("norm_epsilon", None, "Batch-norm epsilon (default: the source's, 1e-5; for "
                   "--source=torchvision_v1 required unless the file is torchvision's published "
                   "COCO file, recognized by its SHA-256, which runs with 0.0).")
flags.mark_flags_as_required(["source", "input", "output"])


def main(argv):
  del argv
  overrides = {} if FLAGS.norm_epsilon is None else {"norm_epsilon": FLAGS.norm_epsilon}
  try:
    description = weights.convert(FLAGS.input, FLAGS.output, source=FLAGS.source,
                                  backbone=FLAGS.backbone, class_mapping=FLAGS.class_mapping,
                                  **overrides)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps({k: v for k, v in description.to_json().items() if k != "label_map"}, indent=2))
  print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  errors.run(main)  # expected failures: one paragraph and an exit code (docs/failures.md)
