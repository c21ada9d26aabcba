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

import os

from retinanet_jax import console  # (imports no JAX, no TensorFlow)

console.quiet_native_logs()  # before the config file's imports start TensorFlow

from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=wrong-import-position

from retinanet_jax import errors, xla_flags  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]) choosing the "
                                "data and evaluation settings; default: the run's config.json.",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "Training workdir, one step's folder, or converted weights.")
flags.DEFINE_string("output", None, "Where to write eval_<step|converted>.json (default: no file).")
flags.DEFINE_bool("verbose", False, "Show the libraries' log lines (Orbax, TFDS, JAX) on the console.")
flags.mark_flags_as_required(["checkpoint"])


def check_inputs() -> None:
  """Fails early, with one paragraph, when --checkpoint is no saved model (exit code 4) or when no
  config says which data to evaluate on (exit code 2)."""
  from retinanet_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from retinanet_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  checkpoints.locate(FLAGS.checkpoint)
  if FLAGS.config is None:
    try:
      config_lib.load_run_config(FLAGS.checkpoint)
    except FileNotFoundError as e:
      raise app.UsageError(f"{e}: give --config=CONFIG_FILE to choose the data to evaluate on "
                           f"(e.g. --config=configs/r50_fpn.py)") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(verbose=FLAGS.verbose, log_path=os.path.join(FLAGS.output, "log.txt")
                if FLAGS.output else None)
  flags_cpu = FLAGS.config.runtime.xla_flags_cpu if FLAGS.config is not None else None
  xla_flags.apply_xla_flags(" ".join(xla_flags.CPU_FLAGS) if flags_cpu is None else flags_cpu)
  from retinanet_jax import evaluation  # pylint: disable=import-outside-toplevel
  from retinanet_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  check_inputs()
  with console.library_stdout():  # TFDS's lines when it builds the synthetic dataset
    metrics = evaluator.evaluate_saved_model(FLAGS.checkpoint, config=FLAGS.config,
                                             output_dir=FLAGS.output)
  print(evaluation.format_table(metrics))


if __name__ == "__main__":
  errors.run(main)
