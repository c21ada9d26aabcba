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

With --output, every evaluated dataset's detections are written beside its metrics
(`detections_<step|converted>.json`, COCO results in the dataset's category ids; multi-domain:
`detections_<step|converted>_<dataset>.json`); nothing is overwritten.

A COCO test-dev submission (--mode=predict: no metrics; the split needs no annotations):
    python scripts/evaluate.py --checkpoint=weights/tv_v2 --config=configs/r50_fpn.py --mode=predict \
        --config.data.eval_split=test --config.data.eval_annotations=image_info_test-dev2017.json \
        --output=submission/
writes `submission/detections_test-dev2017_retinanet-jax_results.json` (--testset, --algorithm).

Metrics of an existing results file, no model (ground truth: --annotations, else the eval split of
--config or of --checkpoint's training run; metric and settings from the config's eval section):
    python scripts/evaluate.py --detections=out/detections_20.json --annotations=instances_val.json
    python scripts/evaluate.py --detections=out/detections_20.json --checkpoint=runs/r50
"""

from __future__ import annotations

import os
import re
import sys

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
flags.DEFINE_string("output", None, "Where to write eval_<step|converted>.json and the detections "
                    "(default: no file).")
flags.DEFINE_enum("mode", "evaluate", ["evaluate", "predict"], "evaluate: metrics (and, with "
                  "--output, the detections); predict: only the COCO results file of the split, "
                  "named for the COCO evaluation server (needs --output).")
flags.DEFINE_string("testset", None, "--mode=predict: the results file's test set name (default: "
                    "from data.eval_annotations' image_info_<testset>.json, else the split's name).")
flags.DEFINE_string("algorithm", "retinanet-jax", "--mode=predict: the results file's algorithm "
                    "name (detections_<testset>_<algorithm>_results.json).")
flags.DEFINE_string("detections", None, "Score this COCO results file instead of running a model.")
flags.DEFINE_string("annotations", None, "With --detections: the COCO-format ground truth (default: "
                    "the eval split of --config, or of --checkpoint's training run).")
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


def default_testset() -> str:
  """The results file's test set: `test-dev2017` for data.eval_annotations =
  image_info_test-dev2017.json, else the eval split's name (`test`, `validation`)."""
  config = FLAGS.config
  annotations = (config.data.eval_annotations if config is not None else None) or ""
  match = re.fullmatch(r"image_info_([A-Za-z0-9.-]+)\.json", os.path.basename(annotations))
  if match:
    return match.group(1)
  split = config.data.eval_split if config is not None else "validation"
  return re.sub(r"[^A-Za-z0-9.-]+", "-", split).strip("-") or "test"


def score_detections_file() -> None:
  """--detections: the metrics of a results file against its ground truth, no model."""
  from retinanet_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from retinanet_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from retinanet_jax import evaluation  # pylint: disable=import-outside-toplevel
  from retinanet_jax.data import coco_format  # pylint: disable=import-outside-toplevel
  from retinanet_jax.metrics import counting, results_file, scoring  # pylint: disable=import-outside-toplevel

  if FLAGS.mode != "evaluate":
    raise app.UsageError("--detections scores a results file: it takes no --mode=predict")
  if FLAGS.config is not None:
    config = config_lib.Config.from_config_dict(FLAGS.config)
  elif FLAGS.checkpoint:
    config = config_lib.load_run_config(FLAGS.checkpoint)
  elif FLAGS.annotations:
    config = config_lib.Config()
  else:
    raise app.UsageError("--detections needs its ground truth: --annotations=FILE.json, or "
                         "--config (its eval split), or --checkpoint=RUN (the run's eval split)")
  if FLAGS.annotations:
    ground_truth = coco_format.load_annotations(FLAGS.annotations)
  else:
    if config.data.name == "synthetic":
      with console.library_stdout():
        data_lib.ensure_synthetic_dataset(config.data)
    ground_truth = data_lib.coco_ground_truth(config.data)
  detections = results_file.read_results(FLAGS.detections, ground_truth=ground_truth)
  e = config.eval
  result = scoring.score(ground_truth, detections, metric=e.metric, max_dets=e.max_dets,
                         backend=e.backend, miss_rate_category=e.miss_rate_category,
                         count_threshold=e.count_score_threshold)
  print(evaluation.format_report(result))
  if "count_mae" in result.metrics:
    print(counting.format_counts(result.metrics))
  if FLAGS.output:
    os.makedirs(FLAGS.output, exist_ok=True)
    stem = os.path.splitext(os.path.basename(FLAGS.detections))[0]
    path = os.path.join(FLAGS.output, f"eval_{stem}.json")
    from retinanet_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
    evaluator.refuse_existing([path])
    evaluation.write_metrics(path, result.metrics, detections_file=os.path.abspath(FLAGS.detections),
                             num_detections=len(detections), **result.to_json())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.detections:
    console.setup(verbose=FLAGS.verbose)
    score_detections_file()
    return
  if not FLAGS.checkpoint:
    raise app.UsageError("give --checkpoint (a model to evaluate) or --detections (a results file)")
  console.setup(verbose=FLAGS.verbose, log_path=os.path.join(FLAGS.output, "log.txt")
                if FLAGS.output else None)
  flags_cpu = FLAGS.config.runtime.xla_flags_cpu if FLAGS.config is not None else None
  xla_flags.apply_xla_flags(" ".join(xla_flags.CPU_FLAGS) if flags_cpu is None else flags_cpu)
  from retinanet_jax import evaluation  # pylint: disable=import-outside-toplevel
  from retinanet_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  check_inputs()
  if FLAGS.reference and not (FLAGS.datasets or FLAGS.coco_o_root):
    raise app.UsageError("--reference needs --datasets or --coco_o_root")
  if FLAGS.mode == "predict":
    if not FLAGS.output or FLAGS.datasets or FLAGS.coco_o_root:
      raise app.UsageError("--mode=predict writes one results file: it needs --output and takes no "
                           "--datasets/--coco_o_root")
    from retinanet_jax.metrics import results_file  # pylint: disable=import-outside-toplevel
    try:
      results_file.submission_name(FLAGS.testset or default_testset(), FLAGS.algorithm)
    except ValueError as e:
      raise app.UsageError(f"--testset / --algorithm: {e}") from None
    ours = sys.stdout  # our lines to the console; TFDS's (inside) to the log
    with console.library_stdout():
      evaluator.predict_saved(FLAGS.checkpoint, config=FLAGS.config, output_dir=FLAGS.output,
                              testset=FLAGS.testset or default_testset(),
                              algorithm=FLAGS.algorithm, log=lambda line: print(line, file=ours))
    return
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
