"""The training loop: multi-device equivalence, a step on mock COCO, a short run that learns, resume,
and the non-finite guard."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import r50_fpn, synthetic
from retinanet_jax import anchors as anchor_lib
from retinanet_jax import data as train_lib_data
from retinanet_jax import evaluate
from retinanet_jax import train
from scripts import detect as detect_script

SIZE = 64


def tiny(config, tmp_path=None):
  """A network small enough for a test: ResNet-18, 32 channels, one head convolution."""
  config.model.backbone = "resnet18"
  config.model.fpn_channels = 32
  config.model.head_num_convs = 1
  config.train.log_every = 1
  config.eval.num_images_png = 0
  if tmp_path is not None:
    config.data.data_dir = str(tmp_path / "tfds")
  return config


def tiny_synthetic(tmp_path, **train_overrides):
  c = tiny(synthetic.get_config(), tmp_path)
  s = c.data.synthetic
  s.image_size, s.num_train, s.num_validation, s.max_objects = SIZE, 96, 16, 3
  s.min_object_size, s.max_object_fraction = 12.0, 0.8
  c.data.train_min_size_range = (SIZE, SIZE)
  c.data.eval_min_size = c.data.max_size = c.data.image_size = SIZE
  c.data.pad_multiple = 64
  c.data.max_boxes = 8
  c.train.batch_size = 8
  c.eval.batch_size = 8
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def random_batch(rng, batch, size, slots=5, num_classes=6):
  xy = rng.uniform(0, size * 0.6, (batch, slots, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(8, size * 0.4, (batch, slots, 2))], -1)
  mask = rng.uniform(size=(batch, slots)) < 0.7
  return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          "image_hw": np.full((batch, 2), size, np.int32),
          "boxes": boxes.astype(np.float32), "labels": rng.integers(0, num_classes, (batch, slots)).astype(np.int32),
          "box_mask": mask, "is_crowd": np.zeros((batch, slots), bool)}


def test_step_on_four_devices_equals_one_device():
  # sync_bn: batch statistics must be global across devices too. SGD, the paper's optimizer (Adam's
  # per-coordinate normalization turns reduction-order noise in near-zero gradients into full steps).
  config = tiny(synthetic.get_config())
  config.model.norm = "sync_bn"
  config.train.optimizer = "sgd"
  config.train.base_lr = 0.02
  config.train.warmup_steps = 0
  anchors = anchor_lib.generate_anchors((SIZE, SIZE), config=train.anchor_config(config)).boxes
  rng = np.random.default_rng(0)
  batches = [random_batch(rng, 8, SIZE) for _ in range(2)]
  results = []
  for devices, reduction in ((jax.devices()[:1], "psum"), (jax.devices()[:4], "psum"),
                             (jax.devices()[:4], "ordered")):
    config.train.grad_reduction = reduction
    mesh = train.make_mesh(devices)
    tx = train.make_optimizer(config.train)
    graphdef, state = train.initial_state(train.create_model(config, seed=0), tx, config)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = train.compile_train_step(graphdef, tx, anchors, config, mesh,
                                    train.learning_rate_schedule(config.train))
    losses = []
    for b in batches:
      state, metrics = step(state, jax.device_put(b, NamedSharding(mesh, P("data"))))
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(state.params), jax.device_get(state.rest)))
  (l1, p1, r1) = results[0]
  for l4, p4, r4 in results[1:]:
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p4) + jax.tree.leaves(r4),
                    jax.tree.leaves(p1) + jax.tree.leaves(r1)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_grad_reduction_is_named():
  config = tiny(synthetic.get_config())
  config.train.grad_reduction = "tree"
  with pytest.raises(ValueError, match="train.grad_reduction must be one of"):
    train.compile_train_step(None, None, None, config, None, None)


@pytest.mark.parametrize("mode, donated", [("auto", False), ("always", True), ("never", False)])
def test_donate_state(mode, donated):
  """'auto' does not donate on the CPU (train.donates_state); only 'always' consumes the input
  state, and every mode takes a real step."""
  config = tiny(synthetic.get_config())
  config.train.donate_state = mode
  config.train.warmup_steps = 0
  anchors = anchor_lib.generate_anchors((SIZE, SIZE), config=train.anchor_config(config)).boxes
  mesh = train.make_mesh(jax.devices()[:1])
  tx = train.make_optimizer(config.train)
  graphdef, state = train.initial_state(train.create_model(config, seed=0), tx, config)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  # Host copies (jax.device_get can share the CPU buffer, and a shared buffer cannot be donated).
  expected = jax.tree.map(lambda x: np.array(x, copy=True), state.params)
  assert train.donates_state(config, mesh) == donated
  step = train.compile_train_step(graphdef, tx, anchors, config, mesh,
                                  train.learning_rate_schedule(config.train))
  batch = jax.device_put(random_batch(np.random.default_rng(0), 2, SIZE), NamedSharding(mesh, P("data")))
  new_state, _ = step(state, batch)
  leaves = jax.tree.leaves(state.params)
  assert all(x.is_deleted() for x in leaves) == donated
  if not donated:  # the input state is intact
    for a, b in zip(leaves, jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)
  assert int(new_state.step) == 1
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.params),
                                                        jax.tree.leaves(expected))]
  assert sum(changed) > len(changed) // 2


def test_unknown_donate_state_is_named():
  config = tiny(synthetic.get_config())
  config.train.donate_state = "sometimes"
  with pytest.raises(ValueError, match="train.donate_state must be one of"):
    train.donates_state(config, train.make_mesh(jax.devices()[:1]))


def _mock_coco_records():
  """Four coco/2017 records (mock_data's own random records are not valid COCO): sizes that are not
  multiples of 32, crowd and non-crowd boxes, one image without objects."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  records = []
  for i, (h, w) in enumerate([(90, 120), (70, 100), (100, 75), (64, 64)]):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    objects = [{"id": 10 * i + k, "area": 100, "label": int(rng.integers(0, 80)),
                "is_crowd": k == 2,
                "bbox": tfds.features.BBox(ymin=0.1 * k, xmin=0.2, ymax=0.1 * k + 0.5, xmax=0.9)}
               for k in range(3 if i < 3 else 0)]
    records.append({"image": buffer.getvalue(), "image/filename": f"{i}.jpg", "image/id": i + 1,
                    "objects": objects})
  return records


def test_one_step_on_mock_coco(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  records = _mock_coco_records()

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del split, read_config, kwargs
    features = self.info.features
    serialized = [features.serialize_example(r) for r in records]
    return tf.data.Dataset.from_tensor_slices(serialized).map(
        lambda s: features.deserialize_example(s, decoders=decoders))

  config = tiny(r50_fpn.get_config("smoke"))
  config.train.steps = 1
  config.data.max_size = 128
  config.data.eval_split = "validation"
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["step"] == 1
  assert set(summary["metrics"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
  assert all(np.isfinite(v) for v in summary["metrics"].values())
  assert os.path.isfile(tmp_path / "run" / "eval_1.json")
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "1")


def test_checkpoints_start_by_removing_unfinished_saves(tmp_path):
  """A killed save leaves Orbax's temporary folder; it is deleted (synchronously) before the
  manager exists, and the committed checkpoint before it is the latest."""
  directory = tmp_path / "checkpoints"
  with ocp.CheckpointManager(directory) as manager:
    manager.save(2, args=ocp.args.StandardSave({"w": np.arange(3.0)}))
  unfinished = directory / "3.orbax-checkpoint-tmp-1795436005123456"
  unfinished.mkdir()
  (unfinished / "partial").write_text("cut off")
  checkpoints = train.Checkpoints(str(tmp_path), keep=2)
  assert sorted(os.listdir(directory)) == ["2"]
  assert checkpoints.latest_step() == 2


def test_short_synthetic_run_learns(tmp_path):
  config = tiny_synthetic(tmp_path, steps=60, base_lr=4e-3, warmup_steps=10, log_every=10,
                          checkpoint_every=60)
  config.eval.num_images_png = 2
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  lines = [l for l in open(workdir / "log.txt") if l.startswith("step ")]
  losses = [float(l.split("loss ")[1].split()[0]) for l in lines]
  assert losses[-1] < 0.7 * losses[0], losses
  assert summary["metrics"]["AP50"] > 0, summary["metrics"]
  assert os.path.isfile(workdir / "detections_60.png") and os.path.isfile(workdir / "label_map.json")
  # scripts/evaluate.py's path restores the checkpoint and gets the same numbers.
  again = evaluate.evaluate_checkpoint(config, str(workdir), output_dir=str(tmp_path / "eval"))
  assert again == pytest.approx(summary["metrics"], abs=1e-6)
  assert os.path.isfile(tmp_path / "eval" / "eval_60.json")
  # scripts/detect.py on a training checkpoint (the config gives the network and the geometry).
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image_path = tmp_path / "one.png"
  batch = next(iter(train_lib_data.make_eval_input(config.data, global_batch_size=8,
                                                   mesh=None).numpy_batches()))
  Image.fromarray(batch["image"][0]).save(image_path)
  results = detect_script.detect_files([str(image_path)], checkpoint=str(workdir),
                                       output=str(tmp_path / "detect"), config=config,
                                       min_size=SIZE, max_size=SIZE, size_divisible=64)
  assert os.path.isfile(tmp_path / "detect" / "one.png")
  assert all(r["category_id"] in train_lib_data.label_map(config.data).category_ids for r in results)


def _restore_params(workdir, step):
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(os.path.join(workdir, "checkpoints", str(step), "default"))["params"]


def test_resume_continues_exactly(tmp_path):
  overrides = dict(steps=6, schedule="step", decay_steps=(4,), warmup_steps=2, checkpoint_every=3,
                   base_lr=2e-3)
  straight = tiny_synthetic(tmp_path, **overrides)
  straight.eval.at_end = False
  train.train_and_evaluate(straight, str(tmp_path / "straight"))
  first = tiny_synthetic(tmp_path, **{**overrides, "steps": 3})
  first.eval.at_end = False
  train.train_and_evaluate(first, str(tmp_path / "split"))
  train.train_and_evaluate(straight, str(tmp_path / "split"))  # resumes at 3
  a, b = _restore_params(tmp_path / "straight", 6), _restore_params(tmp_path / "split", 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_diverging_run_stops_and_saves_nothing_non_finite(tmp_path):
  config = tiny_synthetic(tmp_path, steps=20, base_lr=1e4, warmup_steps=0, checkpoint_every=1,
                          grad_clip_norm=0.0, optimizer="sgd")
  config.eval.at_end = False
  with pytest.raises(train.NonFiniteLossError, match=r"not finite at step \d+.*checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  steps = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints")).all_steps()
  for s in steps:
    for leaf in jax.tree.leaves(_restore_params(tmp_path / "run", s)):
      assert np.all(np.isfinite(leaf))
