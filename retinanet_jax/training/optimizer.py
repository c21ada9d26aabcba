"""The optimizer and its learning-rate schedule, from the typed `train` section (`config.TrainConfig`)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from retinanet_jax import config as config_lib


def learning_rate_schedule(train: config_lib.TrainConfig) -> optax.Schedule:
  """Linear warm-up from `warmup_factor * lr` over `warmup_steps`, then step decay (x `decay_factor`
  at each of `decay_steps`) or cosine decay from the end of warm-up to 0 at `steps`.
  `lr = base_lr * batch_size / 16` (the linear scaling rule; detectron2's 1x: 0.01 for 16 images)."""
  t = train
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


def make_optimizer(train: config_lib.TrainConfig) -> optax.GradientTransformation:
  """SGD with momentum (the paper, detectron2) or AdamW (torchvision v2 recipe), weight decay,
  optional global-norm gradient clipping. Only trainable `nnx.Param`s are ever given to it."""
  t = train
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
