"""Per-host input pipelines and global batches.

Each of `jax.process_count()` hosts builds its part of every global batch (`len(host_rows(...))` =
`global_batch_size / process_count` examples) and turns each leaf into a global `jax.Array` sharded
over mesh axis `'data'` (`jax.make_array_from_process_local_data` with
`NamedSharding(mesh, P('data'))`). Batch keys, dtypes and shapes: the batch table of docs/design.md
(`B` = global batch as jax.Arrays, per-host batch as NumPy).

Training (`TrainInput`): infinite, file- and example-shuffled, augmentations drawn from stateless
seeds (`seed`, position in the stream). Two ways to split the work between hosts:
* `data.global_shuffle=True` (default): every host reads the whole split in the same shuffled order
  (same seed), numbers the examples with their global position, and keeps only the rows of each
  global batch that its devices hold, before decoding and augmenting; augmentation is seeded by the
  global position. The global batch of step `s` is then the same for any process count (1 x 4
  devices and 2 x 2 devices train on identical batches). The cost: every host reads (not decodes)
  every record, so read bandwidth and the shuffle buffer's memory are those of one host reading
  the whole dataset (COCO: ~19 GB read per epoch per host, 1024 x ~160 KB of buffer); decoding and
  augmentation, the expensive part, are still split.
* `data.global_shuffle=False`: each host reads its own part of the split
  (`tfds.split_for_jax_process`) with its own seed; the batches then depend on the process count.

`save_state(path)` / `restore_state(path)` checkpoint the position: the tf.data iterator
(`tf.train.Checkpoint`), so that a restored iterator yields exactly the batches an uninterrupted one
would (with `deterministic=True`), plus a small JSON (batches taken, process count, counters) that
lets a checkpoint continue on another number of processes. `stats` counts images, dropped/truncated
boxes and images with non-finite pixels (set to 0 by transforms.preprocess).

Evaluation (`EvalInput`): every image of the split exactly once across all hosts. All hosts yield
the same number of batches (`num_batches`); the last ones are padded with examples whose
`example_mask` is False (image_id -1, no boxes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from retinanet_jax.data import sources, transforms

# Keys computed on the host for `stats`, never sent to devices.
_HOST_ONLY_KEYS = ("num_dropped_boxes", "num_truncated_boxes", "num_nonfinite_pixels")
_PAD_IMAGE_ID = -1


@dataclasses.dataclass
class InputStats:
  """Counters of one host's training input since step 0 (restored with the iterator)."""

  images: int = 0
  dropped_boxes: int = 0  # degenerate after clipping/cropping
  truncated_boxes: int = 0  # beyond max_boxes
  nonfinite_images: int = 0  # images with NaN/inf pixels after the transforms (set to 0)
  nonfinite_pixels: int = 0  # such values, counted per channel


def _options(data_config) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = bool(data_config.deterministic)
  if data_config.private_threadpool_size:
    options.threading.private_threadpool_size = int(data_config.private_threadpool_size)
  return options


def _host_seed(seed: int, process_index: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(process_index)]).generate_state(1)[0])


def _num_parallel_calls(data_config) -> int:
  n = int(data_config.num_parallel_calls)
  return tf.data.AUTOTUNE if n < 0 else n


def _process(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index must be in 0..{count - 1}, got {index}")
  return index, count


def _per_host_batch(global_batch_size: int, process_count: int, mesh: Mesh | None) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be divisible by the number of "
                     f"processes {process_count}")
  if mesh is not None:
    if "data" not in mesh.axis_names:
      raise ValueError(f"mesh must have a 'data' axis, got axes {mesh.axis_names}")
    if global_batch_size % mesh.shape["data"]:
      raise ValueError(f"global_batch_size {global_batch_size} must be divisible by the 'data' "
                       f"mesh axis size {mesh.shape['data']}")
  return global_batch_size // process_count


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-host NumPy batch -> global jax.Arrays sharded over mesh axis 'data' (leading dim)."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# Training.

def host_rows(global_batch_size: int, *, mesh: Mesh | None, process_index: int,
              process_count: int) -> np.ndarray:
  """The rows of every global batch that this process feeds, in increasing order.

  With a mesh: the rows of the devices of this process under `NamedSharding(mesh, P('data'))`, the
  order `jax.make_array_from_process_local_data` expects. Without one: the `process_index`-th of
  `process_count` equal contiguous blocks.
  """
  per_host = _per_host_batch(global_batch_size, process_count, mesh)
  if mesh is None:
    return np.arange(process_index * per_host, (process_index + 1) * per_host)
  rows = set()
  sharding = NamedSharding(mesh, P("data"))
  for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    rows.update(range(*index[0].indices(global_batch_size)))
  if len(rows) != per_host:
    raise ValueError(f"this process feeds {len(rows)} rows of a global batch of "
                     f"{global_batch_size}, expected {per_host} (= batch / {process_count} processes)")
  return np.array(sorted(rows))


def train_dataset(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                  rows: np.ndarray, process_index: int, process_count: int,
                  start: int = 0) -> tf.data.Dataset:
  """The infinite per-host training tf.data.Dataset of NumPy-able batches of `len(rows)` examples.

  `data_config.global_shuffle` True: every host reads the whole split in one order (same seed), numbers
  the examples (global position `p`), and keeps those with `(p - start) % global_batch_size` in `rows`;
  augmentation is seeded by `p`. False: this host's part of the split, its own seed, positions
  counted on this host. `start`: stream positions already consumed (skipped, read but not decoded).
  """
  builder = sources.open_builder(data_config)
  kind = sources.dataset_kind(builder)
  config = transforms.TransformConfig.from_data_config(data_config)
  options = _options(data_config)
  if data_config.global_shuffle:
    seed = _host_seed(data_config.seed, 0)
    split = data_config.train_split
    options.deterministic = True  # every host must see the same order
  else:
    seed = _host_seed(data_config.seed, process_index)
    split = tfds.split_for_jax_process(data_config.train_split, process_index=process_index,
                                       process_count=process_count)
  ds = sources.read_split(builder, split, shuffle_files=True, seed=seed, options=options)
  ds = ds.map(lambda r: sources.select_fields(r, kind))
  ds = ds.repeat()
  if data_config.shuffle_buffer > 1:
    ds = ds.shuffle(int(data_config.shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
  ds = ds.enumerate()
  if start:
    ds = ds.skip(int(start))
  if data_config.global_shuffle and len(rows) < global_batch_size:
    mine = np.zeros(global_batch_size, bool)
    mine[rows] = True
    mine = tf.constant(mine)
    ds = ds.filter(lambda position, _: tf.gather(mine, (position - start) % global_batch_size))

  def transform(position, fields):
    example = sources.decode_example(fields, kind)
    return transforms.preprocess(example, config=config, train=True,
                                 seed=tf.stack([tf.constant(seed, tf.int64), position]),
                                 image_padding=transforms.ImagePadding.VALID)

  ds = ds.map(transform, num_parallel_calls=_num_parallel_calls(data_config),
              deterministic=bool(options.deterministic))
  # Images are zero-padded while batching (written once into the batch; see ImagePadding).
  padded_shapes = {key: spec.shape for key, spec in ds.element_spec.items()}
  padded_shapes["image"] = tf.TensorShape([*transforms.padded_hw(config), 3])
  ds = ds.padded_batch(len(rows), padded_shapes=padded_shapes, drop_remainder=True)
  ds = ds.prefetch(int(data_config.prefetch))
  return ds.with_options(options)


class TrainInput:
  """Infinite iterator of training batches.

  `next(train_input)` returns global jax.Arrays (or per-host NumPy arrays when built without a
  mesh); `next_numpy()` always returns the per-host NumPy batch. `batches` counts the batches
  taken since step 0 (restored with the position).
  """

  def __init__(self, make_dataset, *, mesh: Mesh | None, process_index: int, process_count: int,
               global_batch_size: int, global_shuffle: bool):
    self._make_dataset = make_dataset  # start position -> tf.data.Dataset
    self.mesh = mesh
    self.process_index = process_index
    self.process_count = process_count
    self.global_batch_size = global_batch_size
    self.global_shuffle = global_shuffle
    self.stats = InputStats()
    self.batches = 0
    self.dataset = make_dataset(0)
    self._iterator = iter(self.dataset)

  def __iter__(self):
    return self

  def next_numpy(self) -> dict[str, np.ndarray]:
    batch = {k: v.numpy() for k, v in next(self._iterator).items()}
    self.batches += 1
    self.stats.images += len(batch["image"])
    self.stats.dropped_boxes += int(batch.pop("num_dropped_boxes").sum())
    self.stats.truncated_boxes += int(batch.pop("num_truncated_boxes").sum())
    nonfinite = batch.pop("num_nonfinite_pixels")
    self.stats.nonfinite_images += int((nonfinite > 0).sum())
    self.stats.nonfinite_pixels += int(nonfinite.sum())
    batch["example_mask"] = np.ones(len(batch["image"]), bool)
    return batch

  def __next__(self):
    batch = self.next_numpy()
    return batch if self.mesh is None else to_global(batch, self.mesh)

  def _prefix(self, path: str, process_index: int) -> str:
    return os.path.join(os.fspath(path), f"input_process_{process_index:05d}")

  def _position(self) -> dict:
    return {"batches": self.batches, "global_batch_size": self.global_batch_size,
            "process_count": self.process_count, "global_shuffle": self.global_shuffle,
            "stats": dataclasses.asdict(self.stats)}

  def save_state(self, path: str) -> None:
    """Writes this host's iterator position under directory `path` (local or a bucket).

    Every process calls it with the same `path`; each writes its own files: the tf.data iterator
    (`input_process_<i>.*`, which holds the shuffle and prefetch buffers of encoded images, so tens
    to hundreds of MB) and `input_process_<i>.json` (batches taken, process count, counters).
    """
    tf.io.gfile.makedirs(os.fspath(path))
    prefix = self._prefix(path, self.process_index)
    tf.train.Checkpoint(iterator=self._iterator).write(prefix)
    with tf.io.gfile.GFile(prefix + ".json", "w") as f:
      json.dump(self._position(), f)

  def restore_state(self, path: str) -> None:
    """Continues from the position written by `save_state(path)`.

    Same process count and global batch: the tf.data iterator is restored (exact with
    `deterministic=True`). Another process count (a checkpoint moved to a bigger or smaller slice),
    or an iterator state written by a different tf.data pipeline (an older version of this module;
    logged as a warning): the stream is rebuilt at the saved position by skipping the examples
    already taken (they are read, not decoded). With `global_shuffle` this continues exactly as the saved run would have;
    without it the hosts' parts of the split differ and only the count of examples is kept. The
    counters of all saved hosts are then added up on process 0.
    """
    saved = self._read_position(path, self.process_index if self._has(path) else 0)
    same = (saved["process_count"] == self.process_count
            and saved["global_batch_size"] == self.global_batch_size
            and saved["global_shuffle"] == self.global_shuffle)
    if same:
      try:
        tf.train.Checkpoint(iterator=self._iterator).read(
            self._prefix(path, self.process_index)).assert_consumed()
      except tf.errors.NotFoundError as e:  # another pipeline definition (e.g. an older version)
        logging.warning("input state in %s was written by a different tf.data pipeline "
                        "(%s); continuing at its position by skipping the %d examples taken",
                        path, str(e).split(".")[0], saved["batches"] * saved["global_batch_size"])
      else:
        self.stats = InputStats(**saved["stats"])
        self.batches = saved["batches"]
        return
    if saved["global_shuffle"] != self.global_shuffle:
      raise ValueError(f"the input state in {path} was written with data.global_shuffle="
                       f"{saved['global_shuffle']}; this run has {self.global_shuffle}")
    examples = saved["batches"] * saved["global_batch_size"]  # taken by all hosts together
    if examples % self.global_batch_size:
      raise ValueError(f"{examples} examples were taken before this checkpoint, not a whole number "
                       f"of global batches of {self.global_batch_size}")
    totals = InputStats()
    if self.process_index == 0:
      for index in range(saved["process_count"]):
        for key, value in self._read_position(path, index)["stats"].items():
          setattr(totals, key, getattr(totals, key) + value)
    start = examples if self.global_shuffle else examples // self.process_count
    self.dataset = self._make_dataset(start)
    self._iterator = iter(self.dataset)
    self.stats = totals
    self.batches = examples // self.global_batch_size

  def _has(self, path: str) -> bool:
    return tf.io.gfile.exists(self._prefix(path, self.process_index) + ".json")

  def _read_position(self, path: str, process_index: int) -> dict:
    with tf.io.gfile.GFile(self._prefix(path, process_index) + ".json", "r") as f:
      return json.load(f)


def make_train_input(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                     mesh: Mesh | None, process_index: int | None = None,
                     process_count: int | None = None) -> TrainInput:
  """The training input of this process (`process_*` default to jax's; override for tests)."""
  index, count = _process(process_index, process_count)
  rows = host_rows(global_batch_size, mesh=mesh, process_index=index, process_count=count)
  make = lambda start: train_dataset(data_config, global_batch_size=global_batch_size, rows=rows,
                                     process_index=index, process_count=count, start=start)
  return TrainInput(make, mesh=mesh, process_index=index, process_count=count,
                    global_batch_size=global_batch_size,
                    global_shuffle=bool(data_config.global_shuffle))


# ------------------------------------------------------------------------------------------------
# Evaluation.

class EvalInput:
  """The eval split, once, in `num_batches` batches on every host; iterable many times."""

  def __init__(self, make_dataset, *, num_batches: int, num_examples: int, mesh: Mesh | None,
               per_host_batch_size: int, global_batch_size: int):
    self._make_dataset = make_dataset
    self.num_batches = num_batches
    self.num_examples = num_examples  # across all hosts
    self.mesh = mesh
    self.per_host_batch_size = per_host_batch_size
    self.global_batch_size = global_batch_size

  def numpy_batches(self):
    """Per-host NumPy batches, from the start of the split."""
    for batch in self._make_dataset().as_numpy_iterator():
      for key in _HOST_ONLY_KEYS:
        batch.pop(key)
      yield batch

  def __iter__(self):
    for batch in self.numpy_batches():
      yield batch if self.mesh is None else to_global(batch, self.mesh)

  def __len__(self) -> int:
    return self.num_batches


def make_eval_input(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                    mesh: Mesh | None, process_index: int | None = None,
                    process_count: int | None = None) -> EvalInput:
  """Evaluation input of `data_config.eval_split` for this process."""
  index, count = _process(process_index, process_count)
  per_host = _per_host_batch(global_batch_size, count, mesh)
  builder = sources.open_builder(data_config)
  kind = sources.dataset_kind(builder)
  config = transforms.TransformConfig.from_data_config(data_config)
  host_splits = [tfds.split_for_jax_process(data_config.eval_split, process_index=i,
                                            process_count=count) for i in range(count)]
  counts = [sources.num_examples(builder, s) for s in host_splits]
  num_batches = math.ceil(max(counts) / per_host) if counts else 0
  num_padding = num_batches * per_host - counts[index]

  def make_dataset() -> tf.data.Dataset:
    options = _options(data_config)
    options.deterministic = True
    ds = sources.read_split(builder, host_splits[index], shuffle_files=False, options=options)

    def transform(record):
      example = sources.decode_example(sources.select_fields(record, kind), kind)
      out = transforms.preprocess(example, config=config, train=False,
                                  seed=tf.zeros([2], tf.int64))
      out["example_mask"] = tf.constant(True)
      return out

    ds = ds.map(transform, num_parallel_calls=_num_parallel_calls(data_config))
    padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    padding["example_mask"] = tf.constant(False)
    padding["image_id"] = tf.constant(_PAD_IMAGE_ID, tf.int32)
    padding["scale"] = tf.ones([2], tf.float32)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
    ds = ds.batch(per_host, drop_remainder=True)
    return ds.prefetch(int(data_config.prefetch)).with_options(options)

  return EvalInput(make_dataset, num_batches=num_batches, num_examples=sum(counts), mesh=mesh,
                   per_host_batch_size=per_host, global_batch_size=global_batch_size)
