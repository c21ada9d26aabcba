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
`input_images_per_second(...)` (benchmark.py), `build_tfds_dataset` (coco_format.py, behind
scripts/prepare_dataset.py), `SyntheticConfig` (synthetic.py, the synthetic dataset's knobs).

Module map: config.py (every field), sources.py (datasets -> one example format, ground truth),
coco_format.py (COCO JSON -> TFDS), synthetic.py (rendering), transforms.py (geometry),
pipeline.py (per-host tf.data, global arrays, iterator state), labels.py (LabelMap),
benchmark.py.
"""

from retinanet_jax.data.coco_format import CocoFormatError, build_tfds_dataset
from retinanet_jax.data.config import default_data_config, synthetic_data_config
from retinanet_jax.data.labels import (COCO_LABEL_MAP, LabelMap, load_label_map,
                                          save_label_map)
from retinanet_jax.data.pipeline import (EvalInput, InputStats, TrainInput, make_eval_input,
                                         make_train_input)
from retinanet_jax.data.sources import (coco_ground_truth, ensure_synthetic_dataset, label_map,
                                        load_examples)
from retinanet_jax.data.synthetic import SyntheticConfig
from retinanet_jax.data.transforms import padded_hw, TransformConfig

__all__ = [
    "COCO_LABEL_MAP", "CocoFormatError", "EvalInput", "InputStats", "LabelMap", "SyntheticConfig",
    "TrainInput", "TransformConfig", "build_tfds_dataset", "coco_ground_truth",
    "default_data_config", "ensure_synthetic_dataset", "label_map", "load_examples",
    "load_label_map", "make_eval_input", "make_train_input", "padded_hw", "save_label_map",
    "synthetic_data_config",
]
