"""COCO evaluation of a saved RetinaNet: a training run, one of its steps, or converted weights.

    python scripts/evaluate.py --checkpoint=runs/r50                    # the run's own eval split
    python scripts/evaluate.py --checkpoint=runs/r50/checkpoints/45000  # one step
    python scripts/evaluate.py --checkpoint=weights/tv_v1 --config=configs/r50_fpn.py  # converted

The network, anchors, input normalization and class -> category-id map come from the checkpoint's
model description (retinanet_jax/checkpoints.py). The data and evaluation settings come from
--config when given, else from the training run's `config.json` (converted weights have none, so
they need --config: it chooses the dataset, e.g. --config.data.eval_split=validation[:500]).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from retinanet_jax import xla_flags  # (imports no JAX)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]) choosing the "
                                "data and evaluation settings; default: the run's config.json.",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "Training workdir, one step's folder, or converted weights.")
flags.DEFINE_string("output", None, "Where to write eval_<step|converted>.json (default: no file).")
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  flags_cpu = FLAGS.config.runtime.xla_flags_cpu if FLAGS.config is not None else None
  xla_flags.apply_xla_flags(" ".join(xla_flags.CPU_FLAGS) if flags_cpu is None else flags_cpu)
  from retinanet_jax import evaluation  # pylint: disable=import-outside-toplevel
  from retinanet_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  result = evaluator.evaluate_saved(FLAGS.checkpoint, config=FLAGS.config, output_dir=FLAGS.output)
  print(evaluation.format_report(result))
  from retinanet_jax.evaluation import counting  # pylint: disable=import-outside-toplevel
  if "count_mae" in result.metrics:
    print(counting.format_counts(result.metrics))


if __name__ == "__main__":
  app.run(main)
