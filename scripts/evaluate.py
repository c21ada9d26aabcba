"""COCO evaluation of a saved RetinaNet: a training run, one of its steps, or converted weights.

    python scripts/evaluate.py --checkpoint=runs/r50                    # the run's own eval split
    python scripts/evaluate.py --checkpoint=runs/r50/checkpoints/45000  # one step
    python scripts/evaluate.py --checkpoint=weights/tv_v1 --config=configs/r50_fpn.py  # converted

Several COCO-format folders in one run (COCO-O's domains: `<domain>/val2017/` and
`<domain>/annotations/instances_val2017.json`; retinanet_jax/evaluation/multi_domain.py), with the
config's own evaluation data (e.g. COCO val) as the reference of the relative drop:
    python scripts/evaluate.py --checkpoint=weights/tv_v1 --config=configs/r50_fpn.py \
        --coco_o_root=/data/COCO-O --reference=config --output=eval/
    python scripts/evaluate.py --checkpoint=runs/r50 --datasets=/data/a,/data/b --reference=/data/coco

The network, anchors, input normalization and class -> category-id map come from the checkpoint's
model description (retinanet_jax/checkpoints/). The data and evaluation settings come from
--config when given, else from the training run's `config.json` (converted weights have none, so
they need --config: it chooses the dataset, e.g. --config.data.eval_split=validation[:500]).
"""

from __future__ import annotations

import os

from retinanet_jax.runtime import console  # (imports no JAX, no TensorFlow)

console.quiet_native_logs()  # before the config file's imports start TensorFlow

from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=wrong-import-position

from retinanet_jax.runtime import errors, xla_flags  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]) choosing the "
                                "data and evaluation settings; default: the run's config.json.",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "Training workdir, one step's folder, or converted weights.")
flags.DEFINE_string("output", None, "Where to write eval_<step|converted>.json (default: no file).")
flags.DEFINE_list("datasets", [], "COCO-format folders (<dir>/val2017/, <dir>/annotations/"
                  "instances_val2017.json) to evaluate on, each reported, then their mean.")
flags.DEFINE_string("coco_o_root", None, "A folder whose subfolders are such datasets (COCO-O's "
                    "six domains); added to --datasets.")
flags.DEFINE_string("reference", None, "With --datasets/--coco_o_root: 'config' (the config's own "
                    "evaluation data, e.g. COCO val) or a COCO-format folder, evaluated too; the "
                    "report gives the relative drop of the mean against it.")
flags.DEFINE_string("cache_dir", None, "Where the folders' TFDS copies are made once and kept "
                    "(default: the config's data.data_dir, else TFDS's folder).")
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
  if FLAGS.reference and not (FLAGS.datasets or FLAGS.coco_o_root):
    raise app.UsageError("--reference needs --datasets or --coco_o_root")
  if FLAGS.datasets or FLAGS.coco_o_root:
    from retinanet_jax.evaluation import multi_domain  # pylint: disable=import-outside-toplevel
    domains = [multi_domain.domain_from_folder(d) for d in FLAGS.datasets]
    domains += multi_domain.domains_under(FLAGS.coco_o_root) if FLAGS.coco_o_root else []
    with console.library_stdout():  # TFDS's lines when it builds the folders' copies
      result = multi_domain.evaluate_saved_on_domains(
          FLAGS.checkpoint, domains, config=FLAGS.config, reference=FLAGS.reference,
          data_dir=FLAGS.cache_dir, output_dir=FLAGS.output)
    print(multi_domain.format_report(result))
    return
  with console.library_stdout():  # TFDS's lines when it builds the synthetic dataset
    result = evaluator.evaluate_saved(FLAGS.checkpoint, config=FLAGS.config,
                                      output_dir=FLAGS.output)
  print(evaluation.format_report(result))
  from retinanet_jax.metrics import counting  # pylint: disable=import-outside-toplevel
  if "count_mae" in result.metrics:
    print(counting.format_counts(result.metrics))


if __name__ == "__main__":
  errors.run(main)
