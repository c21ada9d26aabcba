"""Input: TFDS COCO, any COCO-format dataset, a built-in synthetic dataset, augmentation, global
batches.

What the trainer calls (all take the `data` ConfigDict of `default_data_config()`):

* `ensure_synthetic_dataset(data_config) -> str`: builds the synthetic TFDS dataset on first use
  (no-op if present; safe with many processes: process 0 builds, the others wait). Call it when
  `data_config.name == "synthetic"`, before anything else below.
* `make_train_input(data_config, *, global_batch_size, mesh) -> TrainInput`: infinite iterator;
  `next()` gives a dict of global `jax.Array`s sharded over mesh axis `'data'` with the keys of
  docs/design.md's batch table; `save_state(path)` / `restore_state(path)` checkpoint its position
  (exact with `deterministic=True`, also on another process count with `global_shuffle=True`, the
  default, under which the global batches do not depend on the process count); `stats` counts
  images, dropped/truncated boxes and images with non-finite pixels (set to 0).
* `make_eval_input(data_config, *, global_batch_size, mesh) -> EvalInput`: iterable (re-iterable)
  over the eval split, every image exactly once across hosts; padding examples have
  `example_mask == False`. `len(eval_input)` batches on every host.
* `coco_ground_truth(data_config) -> dict`: COCO-format ground truth of the eval split in original
  pixels with dataset category ids (pycocotools `COCO().dataset`).
* `label_map(data_config) -> LabelMap`; `save_label_map(label_map, path)`,
  `load_label_map(path)`: contiguous labels <-> category ids and names; save it into the workdir.

Also: `load_examples(data_config, split)` (decoded examples in one format, no augmentation),
`build_tfds_dataset` (coco_format.py, behind scripts/prepare_dataset.py), `SyntheticConfig`
(synthetic.py, the synthetic dataset's knobs).

Module map: config.py (every field), sources.py (datasets -> one example format, ground truth),
coco_format.py (COCO JSON -> TFDS), coco_validation.py (every problem of a COCO-format input, in
one pass), synthetic.py (rendering), transforms.py (geometry), pipeline.py (per-host tf.data, global
arrays, iterator state), labels.py (LabelMap). The input pipeline's throughput (images/s per host
core) is measured outside the package, by benchmarks/input_data.py.
"""

import importlib

# Public name -> the submodule that defines it. Imported on first use (PEP 562), so that
# `from retinanet_jax.data import config` (every config file does) loads neither TensorFlow nor
# TFDS: the model, the losses and the train step run without them (on a GPU machine that has JAX
# and PyTorch but no TensorFlow, `scripts/benchmark.py --suite=accelerator` needs only
# ml_collections beside them).
_EXPORTS = {
    "CocoFormatError": "coco_format", "build_tfds_dataset": "coco_format",
    "DataConfig": "config", "default_data_config": "config", "synthetic_data_config": "config",
    "COCO_LABEL_MAP": "labels", "LabelMap": "labels", "load_label_map": "labels",
    "save_label_map": "labels",
    "EvalInput": "pipeline", "InputStats": "pipeline", "TrainInput": "pipeline",
    "make_eval_input": "pipeline", "make_train_input": "pipeline",
    "coco_ground_truth": "sources", "ensure_synthetic_dataset": "sources", "label_map": "sources",
    "load_examples": "sources",
    "SyntheticConfig": "synthetic",
    "padded_hw": "transforms", "TransformConfig": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
