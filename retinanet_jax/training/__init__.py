"""Training: `train_and_evaluate(config, workdir)` (the loop, `train.py`), the one setup of model,
weights, optimizer and replicated state (`train_state.create_train_state`), the per-device step and its
`jit(shard_map)` (`train_step`), the optimizer and schedule (`optimizer`), the run's checkpoints
(`run_checkpoints`) and where its numbers go (`metric_writer`).

    from retinanet_jax.training import train_and_evaluate
    summary = train_and_evaluate(config, "runs/mine")
"""

import importlib

_EXPORTS = {"train_and_evaluate": "train", "NonFiniteLossError": "train",
            "DivergenceError": "train", "create_train_state": "train_state",
            "TrainState": "train_state"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  # Imported on first use (PEP 562): `retinanet_jax.training.train_state` alone does not load the
  # loop and its input pipeline (TensorFlow).
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
