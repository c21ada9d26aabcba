"""Per-host reading, evaluation padding, global arrays, determinism and iterator restore."""

import logging

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from retinanet_jax.data import make_eval_input, make_train_input, pipeline, sources
from retinanet_jax.data.pipeline import TrainInput
from data_test_utils import assert_tree_equal


def _ids(config, split):
  return [int(e["image_id"]) for e in sources.load_examples(config, split).as_numpy_iterator()]


def test_per_host_mode_reads_every_training_example_once(tiny_synthetic_config):
  c = tiny_synthetic_config.copy_and_resolve_references()
  c.global_shuffle = False
  builder = sources.open_builder(c)
  everything = _ids(c, "train")
  parts = []
  for index in range(2):
    split = tfds.split_for_jax_process(c.train_split, process_index=index, process_count=2)
    ds = sources.read_split(builder, split, shuffle_files=True, seed=index)
    parts.append([int(r["image/id"]) for r in ds.as_numpy_iterator()])
  assert len(parts[0]) == len(parts[1]) == 24
  assert not set(parts[0]) & set(parts[1])
  assert sorted(parts[0] + parts[1]) == sorted(everything) and len(everything) == 48

  # The training input of each process only ever sees its own part.
  for index in range(2):
    train = make_train_input(c, global_batch_size=8, mesh=None, process_index=index,
                             process_count=2)
    seen = np.concatenate([train.next_numpy()["image_id"] for _ in range(8)])
    assert set(seen.tolist()) <= set(parts[index]) and len(seen) == 32


def _augmenting(config):
  c = config.copy_and_resolve_references()
  c.hflip_prob = 0.5
  c.mode, c.image_size, c.scale_range = "lsj", 64, (0.5, 1.5)  # random crops too
  return c


def _host_batches(config, process_count, n, global_batch=8):
  """`n` global batches, assembled from the per-host batches of `process_count` processes."""
  hosts = [make_train_input(config, global_batch_size=global_batch, mesh=None, process_index=i,
                            process_count=process_count) for i in range(process_count)]
  out = []
  for _ in range(n):
    parts = [h.next_numpy() for h in hosts]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out, hosts


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_shuffle_gives_the_same_global_batches_on_any_process_count(
    tiny_synthetic_config, process_count):
  c = _augmenting(tiny_synthetic_config)
  one, _ = _host_batches(c, 1, 8)  # 64 examples: crosses the 48-example epoch
  many, hosts = _host_batches(c, process_count, 8)
  for a, b in zip(one, many):
    assert_tree_equal(a, b)  # same images, same augmentation, same order
  ids = np.concatenate([b["image_id"] for b in one])
  assert set(ids.tolist()) <= set(_ids(c, "train")) and len(set(ids.tolist())) > 32
  assert sum(h.stats.images for h in hosts) == 64


@pytest.mark.parametrize("saved_on, restored_on", [(2, 1), (1, 4), (4, 2)])
def test_position_restores_exactly_on_another_process_count(tiny_synthetic_config, tmp_path,
                                                             saved_on, restored_on):
  c = _augmenting(tiny_synthetic_config)
  expected, _ = _host_batches(c, 1, 9)
  _, hosts = _host_batches(c, saved_on, 3)
  for h in hosts:
    h.save_state(str(tmp_path / "step3"))
  restored = [make_train_input(c, global_batch_size=8, mesh=None, process_index=i,
                               process_count=restored_on) for i in range(restored_on)]
  for h in restored:
    h.restore_state(str(tmp_path / "step3"))
  assert [h.batches for h in restored] == [3] * restored_on
  assert [h.stats.images for h in restored] == [24] + [0] * (restored_on - 1)  # totals on process 0
  for want in expected[3:]:
    parts = [h.next_numpy() for h in restored]
    assert_tree_equal({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, want)


@pytest.mark.parametrize("process_count, global_batch", [(1, 8), (2, 8), (3, 6)])
def test_eval_reads_the_split_exactly_once_across_processes(tiny_synthetic_config,
                                                            process_count, global_batch):
  everything = _ids(tiny_synthetic_config, "validation")
  assert len(everything) == 21
  seen, batches = [], []
  for index in range(process_count):
    eval_input = make_eval_input(tiny_synthetic_config, global_batch_size=global_batch,
                                 mesh=None, process_index=index, process_count=process_count)
    host = list(eval_input.numpy_batches())
    assert len(host) == eval_input.num_batches == len(eval_input)
    batches.append(len(host))
    for b in host:
      assert b["image"].shape[0] == global_batch // process_count
      seen += b["image_id"][b["example_mask"]].tolist()
      padding = ~b["example_mask"]
      assert (b["image_id"][padding] == -1).all() and not b["box_mask"][padding].any()
      assert not b["image"][padding].any()
    assert eval_input.num_examples == 21
  assert len(set(batches)) == 1  # every host runs the same number of steps
  assert sorted(seen) == sorted(everything)  # none lost, none twice


def test_eval_input_can_be_iterated_again(tiny_synthetic_config):
  eval_input = make_eval_input(tiny_synthetic_config, global_batch_size=8, mesh=None)
  first = [b["image_id"] for b in eval_input.numpy_batches()]
  second = [b["image_id"] for b in eval_input.numpy_batches()]
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))


def test_batches_are_global_arrays_sharded_over_data(tiny_synthetic_config):
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  assert jax.device_count() == 4  # tests/conftest.py
  train = make_train_input(tiny_synthetic_config, global_batch_size=8, mesh=mesh)
  batch = next(train)
  expected = {"image": ((8, 64, 64, 3), np.uint8), "image_hw": ((8, 2), np.int32),
              "boxes": ((8, 32, 4), np.float32), "labels": ((8, 32), np.int32),
              "box_mask": ((8, 32), np.bool_), "is_crowd": ((8, 32), np.bool_),
              "image_id": ((8,), np.int32), "scale": ((8, 2), np.float32),
              "example_mask": ((8,), np.bool_)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  for value in batch.values():
    assert isinstance(value, jax.Array)
    assert value.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), value.ndim)
    assert value.addressable_shards[0].data.shape[0] == 2
  eval_batch = next(iter(make_eval_input(tiny_synthetic_config, global_batch_size=8, mesh=mesh)))
  assert set(eval_batch) == set(expected) and isinstance(eval_batch["example_mask"], jax.Array)


def test_batch_size_must_divide_over_processes_and_the_data_axis(tiny_synthetic_config):
  with pytest.raises(ValueError, match="divisible by the number of processes 2"):
    make_train_input(tiny_synthetic_config, global_batch_size=7, mesh=None, process_index=0,
                     process_count=2)
  mesh = jax.make_mesh((4,), ("data",))
  with pytest.raises(ValueError, match="'data' mesh axis size 4"):
    make_eval_input(tiny_synthetic_config, global_batch_size=6, mesh=mesh)


def test_same_seed_same_batches_other_seed_or_process_other_batches(tiny_synthetic_config):
  def first_batches(config, index=0, n=3):
    train = make_train_input(config, global_batch_size=4, mesh=None, process_index=index,
                             process_count=2)
    return [train.next_numpy() for _ in range(n)]

  a, b = first_batches(tiny_synthetic_config), first_batches(tiny_synthetic_config)
  for x, y in zip(a, b):
    assert_tree_equal(x, y)
  other = tiny_synthetic_config.copy_and_resolve_references()
  other.seed = 1
  assert not np.array_equal(first_batches(other)[0]["image"], a[0]["image"])
  assert not np.array_equal(first_batches(tiny_synthetic_config, index=1)[0]["image_id"],
                            a[0]["image_id"])


def test_restored_iterator_continues_exactly_where_it_was_saved(tiny_synthetic_config, tmp_path):
  c = tiny_synthetic_config.copy_and_resolve_references()
  c.hflip_prob = 0.5
  c.mode, c.image_size, c.scale_range = "lsj", 64, (0.5, 1.5)  # random crops too
  make = lambda: make_train_input(c, global_batch_size=8, mesh=None, process_index=0,
                                  process_count=1)
  uninterrupted = make()
  for _ in range(3):
    uninterrupted.next_numpy()
  uninterrupted.save_state(str(tmp_path / "step3"))
  stats_at_save = uninterrupted.stats.images
  expected = [uninterrupted.next_numpy() for _ in range(5)]  # crosses the 48-image epoch

  restarted = make()
  restarted.next_numpy()  # a fresh iterator elsewhere in the stream
  restarted.restore_state(str(tmp_path / "step3"))
  assert restarted.stats.images == stats_at_save == 24
  for want in expected:
    assert_tree_equal(restarted.next_numpy(), want)


def test_state_of_another_pipeline_definition_resumes_by_skipping(tiny_synthetic_config, tmp_path,
                                                                   caplog):
  """An iterator state that tf.data cannot restore into this pipeline (written by an older version
  of it: here, batches split and joined again) continues at the saved position, exactly, with a
  warning."""
  c = tiny_synthetic_config.copy_and_resolve_references()
  c.hflip_prob = 0.5
  rows = np.arange(8)
  older = TrainInput(lambda start: pipeline.train_dataset(
      c, global_batch_size=8, rows=rows, process_index=0, process_count=1,
      start=start).unbatch().batch(8, drop_remainder=True), mesh=None, process_index=0, process_count=1,
                     global_batch_size=8, global_shuffle=True)
  for _ in range(3):
    older.next_numpy()
  older.save_state(str(tmp_path / "step3"))
  expected = [older.next_numpy() for _ in range(3)]

  restarted = make_train_input(c, global_batch_size=8, mesh=None, process_index=0,
                               process_count=1)
  with caplog.at_level(logging.WARNING):
    restarted.restore_state(str(tmp_path / "step3"))
  assert "different tf.data pipeline" in caplog.text and "skipping the 24 examples" in caplog.text
  assert restarted.batches == 3 and restarted.stats.images == 24
  for want in expected:
    assert_tree_equal(restarted.next_numpy(), want)
