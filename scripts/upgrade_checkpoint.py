"""Rewrite a training run of the first release into the current checkpoint layout, in a new folder.

    python scripts/upgrade_checkpoint.py --config=configs/synthetic.py --checkpoint=runs/old \
        --output=runs/old_v2

The first release saved one `TrainState` item per step and no model description, so its training
config is needed once, to say what model the arrays belong to. The new folder then works like any
run: resume training there, `scripts/evaluate.py --checkpoint=runs/old_v2`, `scripts/detect.py`.
The old run is only read.
"""

from absl import app, flags
from ml_collections import config_flags

from retinanet_jax.runtime import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's training config (configs/*.py[:variant] "
                                "with the same overrides).", lock_config=True)
flags.DEFINE_string("checkpoint", None, "The old run's workdir.")
flags.DEFINE_string("output", None, "A new folder for the upgraded run (must not exist or be empty).")
flags.mark_flags_as_required(["config", "checkpoint", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from retinanet_jax.training import run_checkpoints  # pylint: disable=import-outside-toplevel
  steps = run_checkpoints.upgrade_legacy_run(FLAGS.checkpoint, FLAGS.output, FLAGS.config)
  print(f"wrote steps {steps} of {FLAGS.checkpoint} into {FLAGS.output}")


if __name__ == "__main__":
  errors.run(main)  # expected failures: one paragraph and an exit code (docs/failures.md)
