"""COCO evaluation of a trained or converted RetinaNet on a config's evaluation split.

    python scripts/evaluate.py --config=configs/r50_fpn.py --checkpoint=runs/r50
    python scripts/evaluate.py --config=configs/r50_fpn.py --checkpoint=weights/tv_v1  # converted

A converted torchvision checkpoint brings its own network, anchors, normalization and class ids; the
config then only chooses the data (e.g. --config.data.eval_split=validation) and the eval settings.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from retinanet_jax import xla_flags  # noqa: E402  (imports no JAX)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "Training workdir / checkpoint step folder, or a converted "
                    "checkpoint directory.")
flags.DEFINE_string("output", None, "Where to write eval_<step>.json (default: no file).")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  xla_flags.apply_xla_flags(FLAGS.config.get("xla_flags_cpu", ""))  # a flag already set wins
  from retinanet_jax import evaluate, evaluation  # pylint: disable=import-outside-toplevel
  metrics = evaluate.evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint, output_dir=FLAGS.output)
  print(evaluation.format_table(metrics))


if __name__ == "__main__":
  app.run(main)
