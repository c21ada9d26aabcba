"""A small version of the paper's Table 1a/1b (focal loss alpha and gamma) on any training config.

    python scripts/ablation.py --config=configs/synthetic.py --output=runs/ablation \
        --config.train.steps=300 --config.train.warmup_steps=50

Every setting is one training run through `retinanet_jax.training.train.train_and_evaluate` (the code path of
scripts/train.py: the same input pipeline, sharded train step, checkpoints and COCO evaluation), with
only `loss.alpha` and `loss.gamma` changed, each in its own folder `<output>/gamma<g>_alpha<a>/`:
  (a) gamma = 0 (alpha-balanced cross-entropy) for every alpha of --alphas;
  (b) every gamma of --gammas with a tuned alpha: for gamma = 0 the best alpha of (a) (by AP), for
      gamma > 0 the value --tuned_alphas gives (default: the paper's Table 1b, alpha = 0.25 for
      gamma = 1, 2 and 5). A setting already run in (a) is not run again.
Then it writes `<output>/ablation.json` (every run's settings and COCO metrics) and `<output>/ablation.md`
(the two tables) and prints the tables. notebooks/ablation.ipynb calls this script and plots the result;
docs/ablation.md holds the table of the synthetic config with its command.

--output must be new or empty: nothing is overwritten. An interrupted ablation continues with the same
command plus --resume (finished runs are read back, an unfinished one resumes from its checkpoint);
--resume refuses a folder whose plan (config and settings) differs from the command's.
"""

import json
import math
import os

from absl import app, flags
from ml_collections import config_flags

from retinanet_jax.runtime import xla_flags  # (imports no JAX)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]) of every run.",
                                lock_config=True)
flags.DEFINE_string("output", None, "New or empty folder for the runs and the tables.")
flags.DEFINE_list("alphas", ["0.25", "0.5", "0.75"], "Table (a): alphas tried with gamma = 0.")
flags.DEFINE_list("gammas", ["0", "1", "2", "5"], "Table (b): gammas, each with a tuned alpha.")
flags.DEFINE_list("tuned_alphas", ["1:0.25", "2:0.25", "5:0.25"],
                  "Table (b): gamma:alpha for gamma > 0 (default: the paper's Table 1b). gamma = 0 "
                  "takes the best alpha of table (a).")
flags.DEFINE_bool("resume", False, "Continue an interrupted ablation in --output (same plan).")
flags.mark_flags_as_required(["config", "output"])

PLAN_FILE, RESULTS_FILE, TABLE_FILE = "plan.json", "ablation.json", "ablation.md"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def parse_settings(alphas, gammas, tuned_alphas) -> tuple[list[float], list[float], dict]:
  """Checked floats of the three flags; every problem in one `app.UsageError`."""
  problems = []

  def number(flag, text, lo, hi):
    try:
      value = float(text)
    except ValueError:
      problems.append(f"--{flag}: {text!r} is not a number")
      return None
    if not lo <= value <= hi:
      problems.append(f"--{flag}: {value} is not in [{lo}, {hi}]")
    return value

  alpha_values = [number("alphas", a, 0.0, 1.0) for a in alphas]
  gamma_values = [number("gammas", g, 0.0, math.inf) for g in gammas]
  tuned = {}
  for item in tuned_alphas:
    gamma, sep, alpha = item.partition(":")
    if not sep:
      problems.append(f"--tuned_alphas: {item!r} is not gamma:alpha")
      continue
    tuned[number("tuned_alphas", gamma, 0.0, math.inf)] = number("tuned_alphas", alpha, 0.0, 1.0)
  if not alpha_values:
    problems.append("--alphas: empty")
  if not gamma_values:
    problems.append("--gammas: empty")
  missing = [g for g in gamma_values if g is not None and g > 0 and g not in tuned]
  if missing:
    problems.append(f"--tuned_alphas: no alpha for gamma {missing} (given for {sorted(tuned)})")
  if problems:
    raise app.UsageError("; ".join(problems))
  return alpha_values, gamma_values, tuned


def run_name(alpha: float, gamma: float) -> str:
  return f"gamma{gamma:g}_alpha{alpha:g}"


def prepare_output(output: str, plan: dict, *, resume: bool) -> None:
  """Creates `output` (new or empty), or checks that `--resume` continues the same plan."""
  plan_path = os.path.join(output, PLAN_FILE)
  if resume:
    if not os.path.isfile(plan_path):
      raise app.UsageError(f"--resume: {output} holds no {PLAN_FILE} (not an ablation folder)")
    with open(plan_path) as f:
      stored = json.load(f)
    if stored != plan:
      raise app.UsageError(f"--resume: {plan_path} was written for another config or other "
                           f"settings; use a new --output")
    return
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise app.UsageError(f"--output {output} exists and is not an empty folder; nothing was run "
                         f"(choose a new folder, or add --resume to continue an ablation there)")
  os.makedirs(output, exist_ok=True)
  with open(plan_path, "w") as f:
    json.dump(plan, f, indent=2)


def train_one(config_dict, output: str, alpha: float, gamma: float) -> dict:
  """One training run with `loss.alpha = alpha`, `loss.gamma = gamma`: its settings and metrics."""
  from retinanet_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from retinanet_jax.training import train  # pylint: disable=import-outside-toplevel

  workdir = os.path.join(output, run_name(alpha, gamma))
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.isfile(summary_path):  # finished before an interruption (--resume)
    with open(summary_path) as f:
      summary = json.load(f)
  else:
    c = config_dict.copy_and_resolve_references()
    c.loss.alpha, c.loss.gamma = alpha, gamma
    summary = train.train_and_evaluate(config_lib.Config.from_config_dict(c), workdir)
  return {"alpha": alpha, "gamma": gamma, "run": os.path.basename(workdir),
          "train_seconds": round(summary["train_seconds"], 1),
          **{k: summary["metrics"].get(k) for k in METRICS}}


def _ap(value) -> str:
  return "n/a" if value is None or value < 0 else f"{100 * value:.1f}"


def format_tables(results: dict) -> str:
  """The two tables as Markdown (COCO AP in percent; 'n/a': no ground truth of that size)."""
  lines = ["(a) gamma = 0 (alpha-balanced cross-entropy)", "",
           "| alpha | AP | AP50 | AP75 |", "|---:|---:|---:|---:|"]
  for r in results["table_a"]:
    lines.append(f"| {r['alpha']:g} | {_ap(r['AP'])} | {_ap(r['AP50'])} | {_ap(r['AP75'])} |")
  lines += ["", "(b) focal loss, alpha tuned for each gamma", "",
            "| gamma | alpha | AP | AP50 | AP75 |", "|---:|---:|---:|---:|---:|"]
  for r in results["table_b"]:
    lines.append(f"| {r['gamma']:g} | {r['alpha']:g} | {_ap(r['AP'])} | {_ap(r['AP50'])} | "
                 f"{_ap(r['AP75'])} |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  xla_flags.apply_xla_flags(FLAGS.config.runtime.xla_flags_cpu)  # before JAX starts
  from retinanet_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  try:  # every problem of the config at once, before anything is compiled
    config_lib.Config.from_config_dict(FLAGS.config)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  if not FLAGS.config.eval.at_end:
    raise app.UsageError("--config.eval.at_end=False: the ablation compares the runs' final COCO AP")
  alphas, gammas, tuned = parse_settings(FLAGS.alphas, FLAGS.gammas, FLAGS.tuned_alphas)
  output = os.path.abspath(FLAGS.output)
  plan = {"config": FLAGS.config.to_dict(), "alphas": alphas, "gammas": gammas,
          "tuned_alphas": {f"{g:g}": a for g, a in sorted(tuned.items())}}
  prepare_output(output, json.loads(json.dumps(plan, default=str)), resume=FLAGS.resume)

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")  # tf.data only
  cache_dir = xla_flags.compilation_cache_dir(FLAGS.config.runtime.compilation_cache_dir,
                                            workdir=output)
  if cache_dir:  # one cache for every run: they share the evaluation step
    xla_flags.enable_compilation_cache(cache_dir)

  done: dict[tuple[float, float], dict] = {}

  def run(alpha, gamma):
    if (alpha, gamma) not in done:
      print(f"--- {run_name(alpha, gamma)} ---", flush=True)
      done[(alpha, gamma)] = train_one(FLAGS.config, output, alpha, gamma)
    return done[(alpha, gamma)]

  table_a = [run(alpha, 0.0) for alpha in alphas]
  best_alpha = max(table_a, key=lambda r: r["AP"])["alpha"]
  table_b = [run(best_alpha if gamma == 0 else tuned[gamma], gamma) for gamma in gammas]
  results = {"table_a": table_a, "table_b": table_b, "best_alpha_at_gamma0": best_alpha}
  with open(os.path.join(output, RESULTS_FILE), "w") as f:
    json.dump(results, f, indent=2)
  tables = format_tables(results)
  with open(os.path.join(output, TABLE_FILE), "w") as f:
    f.write(tables)
  print(tables, flush=True)


if __name__ == "__main__":
  app.run(main)
