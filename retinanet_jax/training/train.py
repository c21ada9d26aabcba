"""`train_and_evaluate(config, workdir)`: the RetinaNet training loop, data-parallel over every device.

Read it top to bottom; the sections are: config, mesh, input, model and state, checkpoints, steps,
evaluation, loop, summary. The parts live in their own modules: `train_state.create_train_state`
(model, weights, optimizer, replicated state), `train_step` (the per-device step and its
`jit(shard_map)`), `checkpoints.Checkpoints` (Orbax), `evaluation.evaluator.Evaluator` (COCO),
`metric_writer.Writer` (TensorBoard, metrics.jsonl, console).

On several hosts (`jax.distributed.initialize`, done by scripts/train.py) each host feeds the rows of
the batch that its devices hold; with `data.global_shuffle` (the default) the global batches do not
depend on the number of hosts, so 2 hosts x 2 devices train like 1 x 4 and a checkpoint resumes
exactly on any number of hosts (docs/multihost.md). Only process 0 writes logs, metrics, evaluation
files and pictures.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import config as config_lib
from retinanet_jax import data as data_lib
from retinanet_jax import evaluation
from retinanet_jax.evaluation import evaluator as evaluator_lib
from retinanet_jax.inference import visualization
from retinanet_jax.metrics import counting
from retinanet_jax.runtime import console
from retinanet_jax.runtime import errors
from retinanet_jax.runtime import mesh as mesh_lib
from retinanet_jax.training import metric_writer
from retinanet_jax.training import run_checkpoints
from retinanet_jax.training import train_state as train_state_lib
from retinanet_jax.training import train_step as train_step_lib


class NonFiniteLossError(errors.TrainingStopped):
  """The loss or the gradients stopped being finite; the message names the step and the checkpoint.
  Scripts exit with `errors.TRAINING` (5)."""


class DivergenceError(errors.TrainingStopped):
  """The loss diverged (`train.on_divergence='stop'`); the message names the step where it began and
  the checkpoint to resume from. Scripts exit with `errors.TRAINING` (5)."""


def _check_batch_sizes(config: config_lib.Config) -> None:
  for name, size in (("train.batch_size", config.train.batch_size),
                     ("eval.batch_size", config.eval.batch_size)):
    if size % jax.device_count():
      raise config_lib.ConfigError([f"{name}: {size} is not a multiple of the device count "
                                    f"({jax.device_count()})"])


def config_summary(config: config_lib.Config, workdir: str) -> str:
  """The run in one line (the whole config is in `workdir/config.json`)."""
  t, d, m = config.train, config.data, config.model
  return (f"Config: {m.backbone} ({m.num_classes} classes) on {d.name} {d.train_split!r}, "
          f"{t.steps} step{'s' if t.steps != 1 else ''} of {t.batch_size} images, "
          f"{t.optimizer} lr {t.base_lr:g} ({t.schedule}), "
          f"evaluation on {d.eval_split!r}; workdir {workdir} (config.json, log.txt)")


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains RetinaNet as `config` says (a `config.Config`, or a `ConfigDict` it is built from),
  checkpoints into `workdir`, evaluates; returns a summary.

  Resumes from the latest complete checkpoint in `workdir` (model, optimizer, input position); a
  damaged one is set aside into `workdir/damaged/` and the previous one used
  (`train.on_damaged_checkpoint='fall_back'`), or raises `checkpoints.DamagedCheckpointError`
  ('stop'). Warns when the loss diverges (`train.on_divergence`; 'stop' raises `DivergenceError`).
  Raises `NonFiniteLossError` at the first non-finite loss or gradient, naming the step and the
  checkpoint to resume from.
  """
  # --- Config -----------------------------------------------------------------------------------
  config = config_lib.Config.from_config_dict(config)
  _check_batch_sizes(config)
  t = config.train
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writer.Writer(workdir)
  writer.log(config_summary(config, workdir))

  # --- Mesh -------------------------------------------------------------------------------------
  mesh = mesh_lib.make_mesh()
  writer.log(f"Mesh: {jax.device_count()} devices ({jax.local_device_count()} local) on "
             f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}, platform "
             f"{jax.default_backend()}")

  # --- Input ------------------------------------------------------------------------------------
  if config.data.name == "synthetic":
    with console.library_stdout():  # TFDS's own lines go to log.txt
      data_lib.ensure_synthetic_dataset(config.data)
  labels = data_lib.label_map(config.data)
  if labels.num_classes != config.model.num_classes:
    raise config_lib.ConfigError([f"model.num_classes: {config.model.num_classes}, but the dataset "
                                  f"{config.data.name!r} has {labels.num_classes} classes"])
  if jax.process_index() == 0:
    data_lib.save_label_map(labels, os.path.join(workdir, "label_map.json"))
    with open(os.path.join(workdir, config_lib.RUN_CONFIG_FILE), "w") as f:
      json.dump(config.to_json(), f, indent=2)  # for scripts/evaluate.py; no runtime section
  make_input = lambda: data_lib.make_train_input(config.data, global_batch_size=t.batch_size,
                                                 mesh=mesh)
  train_input = make_input()
  image_hw = data_lib.padded_hw(data_lib.TransformConfig.from_data_config(config.data))
  anchor_set = anchor_lib.generate_anchors(image_hw, config=config.anchors)

  # --- Model, optimizer, state ------------------------------------------------------------------
  setup = train_state_lib.create_train_state(config, mesh, log=writer.log)
  writer.log(f"Model: {config.model.backbone}, {setup.num_parameters:,} parameters "
             f"({setup.num_trained:,} trained)")
  description = train_state_lib.describe(config, labels)
  state = setup.state

  # --- Checkpoints ------------------------------------------------------------------------------
  checkpoints = run_checkpoints.Checkpoints(workdir, keep=t.keep_checkpoints,
                                            description=description)
  # The newest checkpoint that restores; a damaged one is set aside or stops the run
  # (train.on_damaged_checkpoint). None: from scratch.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  start, restored, train_input = checkpoints.restore_newest(
      abstract, train_input, make_input, on_damaged=t.on_damaged_checkpoint, log=writer.log)
  if start is not None:
    state = restored
    writer.log(f"Resumed from step {start} ({checkpoints.directory})")
  start = start or 0

  # --- Steps and evaluation ---------------------------------------------------------------------
  train_fn = train_step_lib.compile_train_step(setup, config, mesh, anchor_set.boxes)
  evaluator = evaluator_lib.Evaluator.for_data(config.data, eval_config=config.eval,
                                               graphdef=setup.eval_graphdef,
                                               description=description, mesh=mesh)

  def run_eval(step: int, state) -> dict[str, float]:
    began = time.time()
    result, detections = evaluator.evaluate(state.params, state.rest)
    metrics = result.metrics
    if jax.process_index() == 0:
      evaluation.write_metrics(os.path.join(workdir, f"eval_{step}.json"), metrics, step=step,
                               num_detections=len(detections), **result.to_json())
      with open(os.path.join(workdir, f"detections_{step}.json"), "w") as f:
        json.dump(detections, f)
    writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    writer.log(f"Evaluation at step {step} ({evaluator.num_images} images, "
               f"{time.time() - began:.0f} s):\n{evaluation.format_report(result)}"
               + (f"\n{counting.format_counts(metrics)}" if "count_mae" in metrics else ""))
    return metrics

  divergence_keys = ("episodes", "diverged_at", "diverged_loss", "diverged_median", "steps_above")
  guard_seen = {"episodes": int(jax.device_get(state.divergence["episodes"]))}  # warned already

  def check_finite(state) -> None:
    """The non-finite and divergence guards, read with one transfer from the device."""
    bad, div = jax.device_get((state.nonfinite_step,
                               {k: state.divergence[k] for k in divergence_keys}))
    bad = int(bad)
    if bad < 0 and int(div["episodes"]) > guard_seen["episodes"]:
      guard_seen["episodes"] = int(div["episodes"])
      at = int(div["diverged_at"])
      what = (f"the loss diverged at step {at}: {t.divergence_patience} steps in a row from there "
              f"were above {t.divergence_factor:g} x the median of the previous losses (loss "
              f"{float(div['diverged_loss']):.4g} at step {at}, median "
              f"{float(div['diverged_median']):.4g})")
      if t.on_divergence == "stop":
        checkpoints.wait()
        good = [s for s in checkpoints.manager.all_steps() if s < at]
        where = (f"the last checkpoint before it is step {max(good)} in {checkpoints.directory}"
                 if good else "no checkpoint was written before it")
        message = (f"{what}; {where} (later ones hold the diverging model). Lower train.base_lr or "
                   f"enable train.grad_clip_norm, then resume from that checkpoint (move the later "
                   f"step folders out of {checkpoints.directory}), or set "
                   f"train.on_divergence=warn to train on.")
        writer.log(f"Stopping (train.on_divergence='stop'): {message}")
        raise DivergenceError(message)
      action = ("the updates of steps above the threshold are skipped"
                if t.on_divergence == "skip" else "training goes on")
      writer.log(f"Warning: {what}; {action} (train.on_divergence={t.on_divergence!r}). Lower "
                 f"train.base_lr or enable train.grad_clip_norm; train.on_divergence=stop stops "
                 f"at the first divergence.")
    if bad >= 0:
      checkpoints.wait()
      message = (
          f"the loss or its gradient was not finite at step {bad + 1} (numbered as in the log; the "
          f"state stayed at step {bad}); no update was applied from then on and nothing "
          f"non-finite was saved; {checkpoints.describe()}. Lower train.base_lr or enable "
          f"train.grad_clip_norm, then rerun the same command to resume from it.")
      writer.log(f"Stopping: {message}")
      raise NonFiniteLossError(message)

  nonfinite_images = metric_writer.input_stats(train_input)["nonfinite_images"]

  def check_input(step: int) -> None:
    """Logs images whose pixels turned non-finite in the transforms (set to 0 by the pipeline)."""
    nonlocal nonfinite_images
    total = metric_writer.input_stats(train_input)["nonfinite_images"]
    if total > nonfinite_images:
      writer.log(f"Warning: {total - nonfinite_images} training images had non-finite pixels after "
                 f"the transforms (set to 0) before step {step}; {total} since step 0")
      writer.scalars(step, {"input/nonfinite_images": total})
      nonfinite_images = total

  # --- Loop -------------------------------------------------------------------------------------
  writer.log(f"Training steps {start}..{t.steps}, global batch {t.batch_size}, input "
             f"{image_hw[0]}x{image_hw[1]}, {anchor_set.num_anchors} anchors")
  metrics_eval: dict[str, float] = {}
  began = last_time = time.time()
  last_step = step = start
  compile_seconds = None
  while step < t.steps:
    batch = next(train_input)
    state, metrics = train_fn(state, batch)
    step += 1
    if compile_seconds is None:
      jax.block_until_ready(metrics["loss"])
      compile_seconds = time.time() - began
      writer.log(f"First step (compilation included) took {compile_seconds:.1f} s")
      last_time, last_step = time.time(), step
    if step % t.check_finite_every == 0:
      check_finite(state)
    if step % t.log_every == 0 or step == t.steps or step == start + 1:
      check_input(step)
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      speed = "  (compilation step)"
      if step > last_step:
        now = time.time()
        rate = (step - last_step) * t.batch_size / max(now - last_time, 1e-9)
        eta = (t.steps - step) * t.batch_size / max(rate, 1e-9)
        last_time, last_step = now, step
        values["images_per_second"] = rate
        speed = f"  {rate:.1f} img/s  ETA {metric_writer.format_eta(eta)}"
      writer.scalars(step, {f"train/{k}": v for k, v in values.items()})
      writer.log(f"step {step}/{t.steps}  loss {values['loss']:.4f} (cls {values['cls_loss']:.4f}, "
                 f"box {values['box_loss']:.4f})  positives {values['num_positives']:.0f}  lr "
                 f"{values['learning_rate']:.2e}{speed}")
    if step % t.checkpoint_every == 0 or step == t.steps:
      check_finite(state)
      checkpoints.save(step, state, train_input)
    if t.eval_every and step % t.eval_every == 0 and step != t.steps:
      metrics_eval = run_eval(step, state)
  check_finite(state)
  checkpoints.wait()
  train_seconds = time.time() - began

  # --- Final evaluation and summary -------------------------------------------------------------
  if config.eval.at_end:
    metrics_eval = run_eval(step, state)
    if config.eval.num_images_png and jax.process_index() == 0:
      path = os.path.join(workdir, f"detections_{step}.png")
      with open(os.path.join(workdir, f"detections_{step}.json")) as f:
        detections = json.load(f)
      visualization.save_eval_examples(path, evaluator.eval_input, detections, labels,
                                       num_images=config.eval.num_images_png,
                                       score_threshold=config.eval.png_score)
      writer.log(f"Wrote {path}")
  checkpoints.close()
  div = {k: v.item() for k, v in jax.device_get(
      {k: state.divergence[k] for k in divergence_keys}).items()}
  if t.on_divergence == "off":
    writer.log("Divergence guard: off")
  else:
    writer.log(f"Divergence guard ({t.on_divergence}): {div['episodes']} divergence"
               f"{'s' if div['episodes'] != 1 else ''}"
               + (f" (the latest from step {div['diverged_at']})" if div["episodes"] else "")
               + f", {div['steps_above']} steps above {t.divergence_factor:g} x the running median"
               + (" (their updates skipped)" if t.on_divergence == "skip" else ""))
  stats = metric_writer.input_stats(train_input)
  writer.log(f"Input: {stats['images']} images read, {stats['dropped_boxes']} degenerate boxes "
             f"dropped, {stats['truncated_boxes']} boxes beyond max_boxes truncated, "
             f"{stats['nonfinite_images']} images with non-finite pixels set to 0")
  summary = {"step": step, "train_seconds": train_seconds, "compile_seconds": compile_seconds,
             "metrics": metrics_eval, "input": stats,
             "divergence": {"policy": t.on_divergence, **div}}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
