"""The train step: a per-device function with named-axis collectives, compiled with
`jax.jit(jax.shard_map(...))` over the 1-D `'data'` mesh (the pmap model written the current way).

Per device: normalize the images, run the network, label the anchors (`labeling.label_anchors`),
sum the losses (`losses.retinanet_losses`), divide by the loss normalizer, which is global: the
positive anchors of the whole batch summed over devices (`lax.psum`), or their EMA
(`loss.normalizer='ema'`, detectron2). Gradients are averaged over devices (`collectives.mean`:
`lax.pmean`, or in device order with `runtime.grad_reduction='ordered'`). The state is replicated
(`P()`), the batch sharded (`P('data')`).

The non-finite guard: a step whose loss or gradient is not finite leaves the state unchanged and
records its step in `state.nonfinite_step`; from then on every step is a no-op, so nothing
non-finite is ever saved. The loop (train.py) checks it on the host.

The divergence guard (`train.on_divergence`; `divergence_update`) catches a loss that explodes and
stays finite: a step is above the threshold when its loss exceeds `divergence_factor` x the median
of the previous `divergence_window` finite losses, and the run has diverged when
`divergence_patience` steps in a row are. It is computed here, on device, rather than by the host
from the logged losses: the loss is already on device (no extra transfer per step), the host reads
the guard's few scalars together with the non-finite flag it fetches anyway, and 'skip' must
decide before the update is applied, which only the step can. Its state is part of the
checkpoint, so a resumed run judges its steps as the uninterrupted one would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from retinanet_jax import config as config_lib
from retinanet_jax import labeling
from retinanet_jax import losses
from retinanet_jax.models import preprocessing
from retinanet_jax.runtime import collectives
from retinanet_jax.runtime.mesh import DATA_AXIS
from retinanet_jax.training.train_state import TrainSetup, TrainState


def loss_normalizer(num_positives, *, mode: str, ema_state=None, momentum: float = 0.9,
                    axis_name: str | None = DATA_AXIS):
  """`(normalizer, global_positives)`: the divisor of the loss sums.

  `num_positives` is this device's count; with `axis_name` it is summed over the axis. `mode`
  'batch': `max(1, positives)`; 'ema': `momentum * ema_state + (1 - momentum) * max(1, positives)`
  (the new EMA state is the normalizer itself).
  """
  positives = jnp.asarray(num_positives, jnp.float32)
  if axis_name is not None:
    positives = jax.lax.psum(positives, axis_name)
  floor = jnp.maximum(positives, 1.0)
  if mode == "batch":
    return floor, positives
  if mode == "ema":
    return momentum * ema_state + (1.0 - momentum) * floor, positives
  raise ValueError(f"loss.normalizer must be one of {config_lib.NORMALIZERS}, got {mode!r}")


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def divergence_update(guard: dict, loss: jax.Array, step: jax.Array, *, factor: float,
                      patience: int) -> tuple[dict, jax.Array]:
  """`(new guard state, above)`: the divergence guard after the step numbered `step` (1-based, as
  the log numbers them) with the finite-or-not scalar `loss`.

  `guard`: `train_state.initial_divergence_state(window)`'s dict. `above`: bool scalar, True when
  `loss > factor * median(guard['recent'])` (the previous finite losses; never on the first step,
  which has none). A streak of `patience` steps above it in a row is a divergence: `episodes` grows
  by one and `diverged_at`, `diverged_loss`, `diverged_median` take the streak's first step, loss
  and median. A non-finite loss changes nothing (the non-finite guard handles it).
  """
  recent = guard["recent"]
  window = recent.shape[0]
  filled = jnp.arange(window) < guard["seen"]  # slots written so far (all once the ring is full)
  median = jnp.nanmedian(jnp.where(filled, recent, jnp.nan))  # NaN while the ring is empty
  finite = jnp.isfinite(loss)
  above = finite & (guard["seen"] > 0) & (loss > factor * median)
  starts = above & (guard["streak"] == 0)
  streak = jnp.where(above, guard["streak"] + 1, 0)
  declared = above & (streak == patience)
  start_step = jnp.where(starts, step, guard["streak_start"])
  start_loss = jnp.where(starts, loss, guard["start_loss"])
  start_median = jnp.where(starts, median, guard["start_median"])
  new = {
      "recent": jnp.where(finite, recent.at[guard["seen"] % window].set(loss), recent),
      "seen": guard["seen"] + finite.astype(jnp.int32),
      "streak": streak,
      "streak_start": start_step,
      "start_loss": start_loss,
      "start_median": start_median,
      "episodes": guard["episodes"] + declared.astype(jnp.int32),
      "diverged_at": jnp.where(declared, start_step, guard["diverged_at"]),
      "diverged_loss": jnp.where(declared, start_loss, guard["diverged_loss"]),
      "diverged_median": jnp.where(declared, start_median, guard["diverged_median"]),
      "steps_above": guard["steps_above"] + above.astype(jnp.int32),
  }
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype), new, guard)
  return new, above


def train_step(graphdef, state: TrainState, batch: dict, *, tx, anchors: np.ndarray,
               config: config_lib.Config, schedule) -> tuple[TrainState, dict]:
  """One optimizer step on this device's share of the batch. Must run under a `'data'` axis."""
  loss_cfg = config.loss
  targets = labeling.label_anchors(
      anchors, batch["boxes"], batch["labels"], batch["box_mask"], gt_is_crowd=batch["is_crowd"],
      positive_threshold=config.matching.positive_threshold,
      negative_threshold=config.matching.negative_threshold,
      low_quality=config.matching.low_quality,
      block_size=config.runtime.matching_block_size)
  normalizer, positives = loss_normalizer(
      targets.num_positives, mode=loss_cfg.normalizer, ema_state=state.normalizer,
      momentum=loss_cfg.normalizer_momentum)
  # Each device's loss is its share of the global batch's: local sums * devices / global
  # normalizer, so that the mean over devices (of the loss and of its gradients) is the whole's.
  scale = jax.lax.psum(1.0, DATA_AXIS)

  def loss_fn(params, rest):
    model = nnx.merge(graphdef, params, rest, copy=True)  # copy: fresh Variables in this trace
    images = preprocessing.normalize_images(batch["image"], batch["image_hw"],
                                            convention=config.input_convention)
    cls_logits, box_deltas = model(images)
    sums = losses.retinanet_losses(
        cls_logits, box_deltas, targets, anchors=anchors, alpha=loss_cfg.alpha,
        gamma=loss_cfg.gamma, box_loss=loss_cfg.box_loss, smooth_l1_beta=loss_cfg.smooth_l1_beta,
        huber_delta=loss_cfg.huber_delta)
    out = losses.normalize(sums, normalizer / scale, box_loss_weight=loss_cfg.box_loss_weight,
                           num_positives=positives)
    new_rest = nnx.state(model, nnx.Not(nnx.Param))
    return out.loss, (out, new_rest)

  (_, (out, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.rest)
  grads = collectives.mean(grads, DATA_AXIS, mode=config.runtime.grad_reduction)
  loss = jax.lax.pmean(out.loss, DATA_AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & _tree_all_finite(grads) & (state.nonfinite_step < 0)
  t = config.train
  divergence, above = state.divergence, jnp.bool_(False)
  if t.on_divergence != "off":
    divergence, above = divergence_update(state.divergence, loss, state.step + 1,
                                          factor=t.divergence_factor,
                                          patience=t.divergence_patience)
    divergence = jax.tree.map(lambda n, o: jnp.where(finite, n, o), divergence, state.divergence)
  # 'skip': a step above the divergence threshold counts (step, guard) but applies no update.
  apply = finite & ~above if t.on_divergence == "skip" else finite
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
  new_state = TrainState(
      step=jnp.where(finite, state.step + 1, state.step),
      params=keep(params, state.params), rest=keep(new_rest, state.rest),
      opt_state=keep(opt_state, state.opt_state),
      normalizer=jnp.where(apply & (loss_cfg.normalizer == "ema"), normalizer, state.normalizer),
      nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step),
      divergence=divergence)
  metrics = {
      "loss": loss,
      "cls_loss": jax.lax.pmean(out.cls_loss, DATA_AXIS),
      "box_loss": jax.lax.pmean(out.box_loss, DATA_AXIS),
      "num_positives": positives,
      "normalizer": normalizer,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": schedule(state.step),
      "diverging": above.astype(jnp.float32),  # 1: above the divergence threshold
  }
  return new_state, metrics


def donates_state(config: config_lib.Config, mesh) -> bool:
  """Whether the train step donates its input state (`runtime.donate_state`).

  Donation lets XLA write the new state over the old one, which saves one copy of the parameters and
  optimizer state in device memory. 'auto' donates on GPUs and TPUs and not on the CPU: XLA:CPU has no
  multi-output fusion, so the update of a parameter and of its momentum are two loops that both read
  the old parameter and the old momentum, and to write either in place XLA first copies the whole
  state (docs/benchmarks.md: the step is faster without donation, for ~0.3 GB more host memory)."""
  mode = config.runtime.donate_state
  if mode == "auto":
    return mesh.devices.flat[0].platform != "cpu"
  return mode == "always"


def compile_train_step(setup: TrainSetup, config: config_lib.Config, mesh, anchors: np.ndarray):
  """`jit(shard_map(train_step))` of a `create_train_state` setup: state replicated, batch sharded
  over 'data', state donated when `donates_state(config, mesh)`. `anchors`: `[A, 4]` NumPy."""
  step = functools.partial(train_step, setup.graphdef, tx=setup.tx, anchors=anchors, config=config,
                           schedule=setup.schedule)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,) if donates_state(config, mesh) else ())
