"""`train_and_evaluate(config, workdir)`: the RetinaNet training loop, data-parallel over every device.

Read it top to bottom; the sections are: mesh, input, model, optimizer, state and shardings, train
step, eval step, checkpoints, evaluation, loop.

Parallelism is the pmap model written the current way: `train_step` is a per-device function whose
collectives (`lax.psum` of the positive-anchor count, `lax.pmean` of the gradients) run over mesh axis
`'data'`, compiled with `jax.jit(jax.shard_map(...))` over a 1-D mesh of all devices of all hosts.
The train state is replicated (`P()`), the batch is sharded (`P('data')`). On several hosts
(`jax.distributed.initialize`, done by scripts/train.py) each host feeds the rows of the batch that its
devices hold; with `data.global_shuffle` (the default) the global batches do not depend on the number
of hosts, so 2 hosts x 2 devices train like 1 x 4 and a checkpoint resumes exactly on any number of
hosts (docs/multihost.md). Only process 0 writes logs, metrics, evaluation files and pictures.

The state is a plain pytree (`TrainState`): trainable parameters (`nnx.Param`), the rest of the model
state (frozen parameters, batch-norm statistics), the optax state, the step, the loss-normalizer EMA and
the first step whose loss was not finite (-1 while all are). Steps are pure functions of
`(graphdef, state, batch)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import collectives
from retinanet_jax import evaluation
from retinanet_jax import losses
from retinanet_jax import postprocess
from retinanet_jax.models import preprocessing
from retinanet_jax.models import retinanet as retinanet_lib

DATA_AXIS = "data"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
NORMALIZERS = ("batch", "ema")
INIT_MODES = ("model", "backbone")
DONATE_STATE = ("auto", "always", "never")


class NonFiniteLossError(RuntimeError):
  """The loss or the gradients stopped being finite; the message names the step and the checkpoint."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything a step reads and writes (a pytree; replicated over the mesh).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: `nnx.State` of the trainable `nnx.Param`s.
    rest: `nnx.State` of everything else in the model (frozen parameters, batch-norm statistics).
    opt_state: the optax state of `params`.
    normalizer: float32 scalar, the loss-normalizer EMA (unused with `loss.normalizer='batch'`).
    nonfinite_step: int32 scalar, the first step whose loss or gradient was not finite, or -1. Once
      set, steps leave the state unchanged, so no non-finite value is ever written to a checkpoint.
  """

  step: jax.Array
  params: Any
  rest: Any
  opt_state: Any
  normalizer: jax.Array
  nonfinite_step: jax.Array


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh `('data',)` over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from `warmup_factor * lr` over `warmup_steps`, then step decay (x `decay_factor`
  at each of `decay_steps`) or cosine decay from the end of warm-up to 0 at `steps`. `lr = base_lr * batch_size / 16`
  (the linear scaling rule; detectron2's 1x: 0.01 for 16 images)."""
  t = train_config
  if t.schedule not in SCHEDULES:
    raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {t.schedule!r}")
  lr = t.base_lr * t.batch_size / 16.0
  warmup = max(int(t.warmup_steps), 0)
  if t.schedule == "step":
    boundaries = {int(s): float(t.decay_factor) for s in t.decay_steps}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:  # cosine from the end of warm-up to 0 at the last step
    cosine = optax.cosine_decay_schedule(lr, decay_steps=max(int(t.steps) - warmup, 1))
    main = lambda step: cosine(jnp.maximum(step - warmup, 0))
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(lr * t.warmup_factor, lr, warmup)
  return lambda step: jnp.where(step < warmup, ramp(step), main(step))


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum (the paper, detectron2) or AdamW (torchvision v2 recipe), weight decay,
  optional global-norm gradient clipping. Only trainable `nnx.Param`s are ever given to it."""
  t = train_config
  if t.optimizer not in OPTIMIZERS:
    raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
  schedule = learning_rate_schedule(t)
  parts = []
  if t.grad_clip_norm and t.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
  if t.optimizer == "sgd":
    # torch.optim.SGD semantics: decay added to the gradient before momentum.
    parts.append(optax.add_decayed_weights(t.weight_decay))
    parts.append(optax.sgd(schedule, momentum=t.momentum))
  else:
    parts.append(optax.adamw(schedule, weight_decay=t.weight_decay))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------
# Model and state
# ----------------------------------------------------------------------------------------------


def anchor_config(config: ml_collections.ConfigDict) -> anchor_lib.AnchorConfig:
  a = config.anchors
  return anchor_lib.AnchorConfig(min_level=a.min_level, max_level=a.max_level,
                                 num_scales=a.num_scales, aspect_ratios=tuple(a.aspect_ratios),
                                 anchor_scale=a.anchor_scale, convention=a.convention)


def create_model(config: ml_collections.ConfigDict, *, seed: int) -> retinanet_lib.RetinaNet:
  model_config = config.model.to_dict()
  model_config["num_anchors"] = anchor_config(config).num_per_location
  return retinanet_lib.build_model(model_config, rngs=nnx.Rngs(seed))


def initial_state(model: nnx.Module, tx: optax.GradientTransformation,
                  config: ml_collections.ConfigDict):
  """`(graphdef, TrainState)` of a freshly built (or freshly loaded) model in training mode."""
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                     opt_state=tx.init(params),
                     normalizer=jnp.asarray(config.loss.normalizer_init, jnp.float32),
                     nonfinite_step=jnp.full((), -1, jnp.int32))
  return graphdef, state


# ----------------------------------------------------------------------------------------------
# Train step (per device; collectives over 'data')
# ----------------------------------------------------------------------------------------------


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train_step(graphdef, state: TrainState, batch: dict, *, tx, anchors: np.ndarray,
               config: ml_collections.ConfigDict, schedule) -> tuple[TrainState, dict]:
  """One optimizer step on this device's share of the batch. Must run under a `'data'` axis.

  Matching and loss run on device; the loss normalizer is the positive-anchor count summed over all
  devices (or its EMA); gradients are averaged over devices with `collectives.mean` (`lax.pmean`, or
  in device order with `train.grad_reduction="ordered"`). Metrics are global means/sums.
  """
  loss_cfg = config.loss

  def loss_fn(params, rest):
    model = nnx.merge(graphdef, params, rest, copy=True)  # copy: fresh Variables in this trace
    images = preprocessing.normalize_images(batch["image"], batch["image_hw"],
                                            convention=config.input_convention)
    cls_logits, box_deltas = model(images)
    out = losses.retinanet_loss(
        cls_logits, box_deltas, anchors=anchors, gt_boxes=batch["boxes"], gt_labels=batch["labels"],
        gt_mask=batch["box_mask"], gt_is_crowd=batch["is_crowd"], alpha=loss_cfg.alpha,
        gamma=loss_cfg.gamma, box_loss=loss_cfg.box_loss, smooth_l1_beta=loss_cfg.smooth_l1_beta,
        huber_delta=loss_cfg.huber_delta, box_loss_weight=loss_cfg.box_loss_weight,
        positive_threshold=loss_cfg.positive_threshold,
        negative_threshold=loss_cfg.negative_threshold, low_quality=loss_cfg.low_quality,
        axis_name=DATA_AXIS,
        normalizer_state=state.normalizer if loss_cfg.normalizer == "ema" else None,
        normalizer_momentum=loss_cfg.normalizer_momentum)
    new_rest = nnx.state(model, nnx.Not(nnx.Param))
    return out.loss, (out, new_rest)

  (_, (out, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.rest)
  grads = collectives.mean(grads, DATA_AXIS, mode=config.train.get("grad_reduction", "psum"))
  loss = jax.lax.pmean(out.loss, DATA_AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & _tree_all_finite(grads) & (state.nonfinite_step < 0)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(
      step=jnp.where(finite, state.step + 1, state.step),
      params=keep(params, state.params), rest=keep(new_rest, state.rest),
      opt_state=keep(opt_state, state.opt_state),
      normalizer=jnp.where(finite & (loss_cfg.normalizer == "ema"), out.normalizer, state.normalizer),
      nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step))
  metrics = {
      "loss": loss,
      "cls_loss": jax.lax.pmean(out.cls_loss, DATA_AXIS),
      "box_loss": jax.lax.pmean(out.box_loss, DATA_AXIS),
      "num_positives": out.num_positives,
      "normalizer": out.normalizer,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": schedule(state.step),
  }
  return new_state, metrics


def donates_state(config: ml_collections.ConfigDict, mesh) -> bool:
  """Whether the train step donates its input state (`train.donate_state`, one of `DONATE_STATE`).

  Donation lets XLA write the new state over the old one, which saves one copy of the parameters and
  optimizer state in device memory. 'auto' donates on GPUs and TPUs and not on the CPU: XLA:CPU has no
  multi-output fusion, so the update of a parameter and of its momentum are two loops that both read
  the old parameter and the old momentum, and to write either in place XLA first copies the whole
  state; measured on R50-FPN 512x512 (docs/benchmarks.md), the step is 5-7% faster without donation,
  for ~0.3 GB more host memory."""
  mode = config.train.get("donate_state", "auto")
  if mode not in DONATE_STATE:
    raise ValueError(f"train.donate_state must be one of {DONATE_STATE}, got {mode!r}")
  if mode == "auto":
    return mesh.devices.flat[0].platform != "cpu"
  return mode == "always"


def compile_train_step(graphdef, tx, anchors, config, mesh, schedule):
  """`jit(shard_map(train_step))`: state replicated, batch sharded over 'data', state donated when
  `donates_state(config, mesh)`."""
  reduction = config.train.get("grad_reduction", "psum")
  if reduction not in collectives.MODES:
    raise ValueError(f"train.grad_reduction must be one of {collectives.MODES}, got {reduction!r}")
  donate = donates_state(config, mesh)
  step = functools.partial(train_step, graphdef, tx=tx, anchors=anchors, config=config,
                           schedule=schedule)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------------------------
# Eval step
# ----------------------------------------------------------------------------------------------


def eval_step(graphdef, params, rest, batch: dict, *, anchor_set: anchor_lib.AnchorSet,
              config: ml_collections.ConfigDict) -> postprocess.Detections:
  """Network + post-processing on this device's images; boxes in network-input pixels."""
  model = nnx.merge(graphdef, params, rest, copy=True)  # copy: fresh Variables in this trace
  images = preprocessing.normalize_images(batch["image"], batch["image_hw"],
                                          convention=config.input_convention)
  cls_logits, box_deltas = model(images)
  e = config.eval
  return postprocess.postprocess_detections(
      cls_logits, box_deltas, anchors=anchor_set, image_hw=batch["image_hw"],
      score_threshold=e.score_threshold, topk_candidates=e.topk_candidates,
      nms_threshold=e.nms_threshold, max_detections=e.max_detections)


def compile_eval_step(graphdef, anchor_set, config, mesh):
  step = functools.partial(eval_step, graphdef, anchor_set=anchor_set, config=config)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                          out_specs=P(DATA_AXIS), check_vma=False)
  return jax.jit(sharded)


def _to_host(x) -> np.ndarray:
  """A global array, gathered to every host as NumPy."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(eval_fn, params, rest, eval_input, *, ground_truth: dict,
             category_ids) -> tuple[dict[str, float], list[dict]]:
  """Runs `eval_fn` over the whole evaluation split once; returns `(metrics, coco_detections)`.

  Detections of every host are gathered to every host; padded examples (`example_mask` False) are
  dropped. Raises if an image of the ground truth was never evaluated or was evaluated twice.
  """
  detections, evaluated = [], []
  for batch in eval_input:
    det = eval_fn(params, rest, batch)
    fields = {k: _to_host(getattr(det, k)) for k in ("boxes", "scores", "classes", "valid")}
    meta = {k: _to_host(batch[k]) for k in ("image_id", "scale", "example_mask")}
    keep = meta["example_mask"].astype(bool)
    detections += evaluation.detections_to_coco(
        image_ids=meta["image_id"], boxes=fields["boxes"], scores=fields["scores"],
        classes=fields["classes"], valid=fields["valid"] & keep[:, None],
        category_ids=category_ids, scale=meta["scale"])
    evaluated += [int(i) for i in meta["image_id"][keep]]
  expected = sorted(int(im["id"]) for im in ground_truth["images"])
  if sorted(evaluated) != expected:
    missing = sorted(set(expected) - set(evaluated))
    extra = sorted(set(evaluated) - set(expected))
    twice = len(evaluated) - len(set(evaluated))
    raise RuntimeError(f"evaluation saw {len(evaluated)} images for {len(expected)} in the ground "
                       f"truth: missing {missing[:10]}, unknown {extra[:10]}, {twice} seen twice")
  return evaluation.coco_evaluate(ground_truth, detections), detections


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


class Checkpoints:
  """Orbax `CheckpointManager` of the `TrainState`, plus each host's input-iterator position.

  A step's input positions are written (under `workdir/input_state/<step>/`) by every host, then all
  hosts meet at a barrier, then its Orbax checkpoint starts (asynchronously: the arrays are copied to
  host memory before `save` returns, so the next step may donate them). Orbax commits a checkpoint
  atomically (written under `<step>.orbax-checkpoint-tmp`, renamed to `<step>` when complete), and
  lists only committed ones, so a checkpoint being written when the process dies is never loaded:
  restore takes the previous complete one, whose input positions were complete before it began.
  Leftovers of a killed save (Orbax's temporary folder, input positions of uncommitted steps) are
  deleted when the next run starts. Checkpoints are written once (Orbax coordinates the hosts) and
  hold global arrays, restorable on any number of processes and devices.
  """

  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.join(workdir, "checkpoints")
    self.input_directory = os.path.join(workdir, "input_state")
    self._remove_unfinished_saves()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=False))
    self._remove_input_states(keep_below=None)

  def _remove_unfinished_saves(self) -> None:
    """Process 0 deletes Orbax's temporary folders of saves that never committed; all hosts wait.

    Done here, before anything else runs, rather than by Orbax's `cleanup_tmp_directories`, which
    deletes them in a background thread that nothing waits for: its listing of the folder then
    overlapped whatever the main thread did next (in tests, TFDS's mocked file system, which is
    process-wide, made that listing fail at random).
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if jax.process_index() == 0 and tf.io.gfile.isdir(self.directory):
      for tmp in ocp.utils.tmp_checkpoints(self.directory):  # TemporaryPath objects (Orbax 0.12)
        tf.io.gfile.rmtree(os.fspath(tmp.get()))
    multihost_utils.sync_global_devices("checkpoints_unfinished_saves_removed")

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def describe(self) -> str:
    step = self.latest_step()
    if step is None:
      return "no checkpoint has been written yet"
    return f"the last good checkpoint is step {step} in {self.directory}"

  def save(self, step: int, state: TrainState, train_input) -> None:
    train_input.save_state(os.path.join(self.input_directory, str(step)))
    multihost_utils.sync_global_devices(f"input_state_{step}")
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._remove_input_states(keep_below=step)

  def restore(self, step: int, abstract_state: TrainState, train_input) -> TrainState:
    state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    if train_input is not None:
      train_input.restore_state(os.path.join(self.input_directory, str(step)))
    return state

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._remove_input_states(keep_below=None)

  def _remove_input_states(self, *, keep_below: Optional[int]) -> None:
    """Process 0 deletes the input positions of steps without a committed checkpoint (all of them,
    or only those below `keep_below`: a save of `keep_below` may still be in flight)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if jax.process_index() != 0 or not tf.io.gfile.isdir(self.input_directory):
      return
    kept = set(ocp.utils.checkpoint_steps(self.directory))  # committed ones, from disk
    for name in tf.io.gfile.listdir(self.input_directory):
      name = name.rstrip("/")
      step = int(name) if name.isdigit() else None
      if step in kept or (keep_below is not None and (step is None or step >= keep_below)):
        continue
      tf.io.gfile.rmtree(os.path.join(self.input_directory, name))

  def close(self) -> None:
    self.wait()
    self.manager.close()


# ----------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------


class Writer:
  """TensorBoard scalars, `workdir/metrics.jsonl` (one JSON line of full-precision scalars per call)
  and a console line, from process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._writer = None
    self._log_path = os.path.join(workdir, "log.txt")
    self._metrics_path = os.path.join(workdir, "metrics.jsonl")
    if self.enabled:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with self._writer.as_default():
      for name, value in values.items():
        tf.summary.scalar(name, float(value), step=step)
    self._writer.flush()
    with open(self._metrics_path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")

  def log(self, message: str) -> None:
    """Prints on process 0 and appends to `workdir/log.txt`."""
    if self.enabled:
      print(message, flush=True)
      with open(self._log_path, "a") as f:
        f.write(message + "\n")


def input_stats(train_input) -> dict[str, int]:
  """The input counters (`data.InputStats`) summed over all hosts (a collective on several)."""
  stats = dataclasses.asdict(train_input.stats)
  if jax.process_count() > 1:
    values = multihost_utils.process_allgather(np.asarray(list(stats.values()), np.int32))
    stats = dict(zip(stats, np.asarray(values).reshape(jax.process_count(), -1).sum(0).tolist()))
  return stats


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _replicated(tree, mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def load_initial_weights(model: nnx.Module, config: ml_collections.ConfigDict, writer: Writer) -> None:
  """`config.init_from`: a converted checkpoint (scripts/convert_weights.py), whole model or backbone."""
  from retinanet_jax import weights  # pylint: disable=import-outside-toplevel

  if config.init_mode not in INIT_MODES:
    raise ValueError(f"init_mode must be one of {INIT_MODES}, got {config.init_mode!r}")
  backbone_only = config.init_mode == "backbone"
  state, metadata = weights.load_converted(config.init_from, backbone_only=backbone_only)
  if metadata.get("input_convention") and metadata["input_convention"] != config.input_convention:
    raise ValueError(f"{config.init_from} was trained with input_convention "
                     f"{metadata['input_convention']!r} but the config says "
                     f"{config.input_convention!r}; set --config.input_convention to match")
  weights.load_into(model.backbone if backbone_only else model, state)
  writer.log(f"Initialized {'backbone' if backbone_only else 'model'} from {config.init_from}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains RetinaNet as `config` says, checkpoints into `workdir`, evaluates; returns a summary.

  Resumes from the latest complete checkpoint in `workdir` (parameters, optimizer, input position).
  Raises `NonFiniteLossError` at the first non-finite loss or gradient, naming the step and the
  checkpoint to resume from.
  """
  from retinanet_jax import data as data_lib  # pylint: disable=import-outside-toplevel

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  writer = Writer(workdir)
  t = config.train
  if t.batch_size % jax.device_count():
    raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of the device count "
                     f"({jax.device_count()})")
  if config.eval.batch_size % jax.device_count():
    raise ValueError(f"eval.batch_size ({config.eval.batch_size}) must be a multiple of the device "
                     f"count ({jax.device_count()})")

  # --- Mesh -------------------------------------------------------------------------------------
  mesh = make_mesh()
  writer.log(f"Mesh: {jax.device_count()} devices ({jax.local_device_count()} local) on "
             f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}, platform "
             f"{jax.default_backend()}")

  # --- Input ------------------------------------------------------------------------------------
  if config.data.name == "synthetic":
    data_lib.ensure_synthetic_dataset(config.data)
  labels = data_lib.label_map(config.data)
  if labels.num_classes != config.model.num_classes:
    raise ValueError(f"the dataset {config.data.name!r} has {labels.num_classes} classes but "
                     f"model.num_classes is {config.model.num_classes}")
  if jax.process_index() == 0:
    data_lib.save_label_map(labels, os.path.join(workdir, "label_map.json"))
  train_input = data_lib.make_train_input(config.data, global_batch_size=t.batch_size, mesh=mesh)
  eval_input = data_lib.make_eval_input(config.data, global_batch_size=config.eval.batch_size,
                                        mesh=mesh)
  image_hw = data_lib.padded_hw(data_lib.TransformConfig.from_data_config(config.data))
  anchor_set = anchor_lib.generate_anchors(image_hw, config=anchor_config(config))

  # --- Model, optimizer, state --------------------------------------------------------------------
  model = create_model(config, seed=config.seed)
  if config.init_from:
    load_initial_weights(model, config, writer)
  writer.log(f"Model: {config.model.backbone}, {retinanet_lib.count_parameters(model):,} parameters "
             f"({sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))):,} trained)")
  tx = make_optimizer(t)
  schedule = learning_rate_schedule(t)
  graphdef, state = initial_state(model, tx, config)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  state = _replicated(state, mesh)

  # --- Checkpoints ------------------------------------------------------------------------------
  checkpoints = Checkpoints(workdir, keep=t.keep_checkpoints)
  start = checkpoints.latest_step()
  if start is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = checkpoints.restore(start, abstract, train_input)
    writer.log(f"Resumed from step {start} ({checkpoints.directory})")
  start = start or 0

  # --- Steps ------------------------------------------------------------------------------------
  train_fn = compile_train_step(graphdef, tx, anchor_set.boxes, config, mesh, schedule)
  eval_fn = compile_eval_step(eval_graphdef, anchor_set, config, mesh)
  ground_truth = data_lib.coco_ground_truth(config.data)
  category_ids = labels.category_ids

  def run_eval(step: int, state: TrainState) -> dict[str, float]:
    began = time.time()
    metrics, detections = evaluate(eval_fn, state.params, state.rest, eval_input,
                                   ground_truth=ground_truth, category_ids=category_ids)
    if jax.process_index() == 0:
      evaluation.write_metrics(os.path.join(workdir, f"eval_{step}.json"), metrics, step=step,
                               num_detections=len(detections))
      with open(os.path.join(workdir, f"detections_{step}.json"), "w") as f:
        json.dump(detections, f)
    writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    writer.log(f"Evaluation at step {step} ({eval_input.num_examples} images, "
               f"{time.time() - began:.0f} s):\n{evaluation.format_table(metrics)}")
    return metrics

  def check_finite(state: TrainState) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
      checkpoints.wait()
      message = (
          f"the loss or its gradient was not finite at step {bad + 1} (numbered as in the log; the "
          f"state stayed at step {bad}); no update was applied from then on and nothing "
          f"non-finite was saved; {checkpoints.describe()}. Lower train.base_lr or enable "
          f"train.grad_clip_norm, then rerun the same command to resume from it.")
      writer.log(f"Stopping: {message}")
      raise NonFiniteLossError(message)

  nonfinite_images = input_stats(train_input)["nonfinite_images"]

  def check_input(step: int) -> None:
    """Logs images whose pixels turned non-finite in the transforms (set to 0 by the pipeline)."""
    nonlocal nonfinite_images
    total = input_stats(train_input)["nonfinite_images"]
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
  last_step = start
  step = start
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
        speed = f"  {rate:.1f} img/s  ETA {_format_eta(eta)}"
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
  if config.eval.at_end:
    metrics_eval = run_eval(step, state)
    if config.eval.num_images_png and jax.process_index() == 0:
      from retinanet_jax import visualization  # pylint: disable=import-outside-toplevel
      path = os.path.join(workdir, f"detections_{step}.png")
      visualization.save_eval_examples(
          path, eval_input, json.load(open(os.path.join(workdir, f"detections_{step}.json"))),
          labels, num_images=config.eval.num_images_png, score_threshold=config.eval.png_score)
      writer.log(f"Wrote {path}")
  checkpoints.close()
  stats = input_stats(train_input)
  writer.log(f"Input: {stats['images']} images read, {stats['dropped_boxes']} degenerate boxes "
             f"dropped, {stats['truncated_boxes']} boxes beyond max_boxes truncated, "
             f"{stats['nonfinite_images']} images with non-finite pixels set to 0")
  summary = {"step": step, "train_seconds": train_seconds, "compile_seconds": compile_seconds,
             "metrics": metrics_eval, "input": stats}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
