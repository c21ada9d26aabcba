"""Guards that keep a run alive, through `train_and_evaluate` and the `Evaluator`.

Training on a dataset made of what breaks detectors: images without annotations (batches with no
valid box), images whose boxes are all crowd, images that a transform turns to NaN. The run goes on
with a finite loss, and the NaN pixels are set to 0, counted and logged. A diverging run (SGD,
learning rate 100) stops at the first non-finite loss naming the step and the checkpoint to resume
from, and no checkpoint holds a non-finite value. Evaluation gives numbers, never a traceback, with no
detections at all, a category without ground truth, and images (or a whole split) without
annotations.
"""

import dataclasses
import io
import json
import math
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from PIL import Image

from configs import synthetic
from retinanet_jax import config as config_lib
from retinanet_jax import data as data_lib
from retinanet_jax import evaluation
from retinanet_jax.data import coco_format, transforms
from retinanet_jax.evaluation import evaluator as evaluator_lib
from retinanet_jax.metrics import counting
from retinanet_jax.runtime import mesh as mesh_lib
from retinanet_jax.training import train, train_state

SIZE = 64
POISON = 7  # images of this solid grey become all-NaN in the (patched) resize
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}, {"id": 3, "name": "never"}]
MIXED = "no_boxes+crowd+poison"


# ----------------------------------------------------------------------------------------------
# The dataset and the config


def _split(first_id, count, *, boxes, crowd=False, poison=False, seed=0):
  """A COCO dict and its PNGs: `count` 64x64 images, `boxes` objects each (categories 1 and 2)."""
  rng = np.random.default_rng(seed)
  images, annotations, encoded = [], [], {}
  for image_id in range(first_id, first_id + count):
    pixels = (np.full((SIZE, SIZE, 3), POISON, np.uint8) if poison else
              rng.integers(0, 120, (SIZE, SIZE, 3), dtype=np.uint8))
    for k in range(boxes):
      x, y = 4 + 28 * (k % 2), 4 + 20 * k
      w, h = (24, 24) if k % 2 == 0 else (28, 12)
      if not poison:
        pixels[y:y + h, x:x + w] = (230, 60 * (k + 1), 40)
      annotations.append({"id": 100 * image_id + k, "image_id": image_id,
                          "category_id": 1 + k % 2, "bbox": [x, y, w, h], "iscrowd": int(crowd),
                          "area": float(w * h)})
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    encoded[image_id] = png.getvalue()
    images.append({"id": image_id, "file_name": f"{image_id}.png", "width": SIZE, "height": SIZE})
  coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
  return coco_format.SplitSource(coco, lambda record, e=encoded: e[record["id"]])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("guards_tfds"))
  validation = _split(200, 4, boxes=2, seed=1)  # plus 4 images without annotations
  more = _split(204, 4, boxes=0, seed=2)
  validation.annotations["images"] += more.annotations["images"]
  read = lambda record, a=validation.read_image, b=more.read_image: (
      a(record) if record["id"] < 204 else b(record))
  coco_format.build_tfds_dataset("guards", {
      "no_boxes": _split(1, 8, boxes=0),
      "crowd": _split(20, 8, boxes=2, crowd=True),
      "poison": _split(40, 4, boxes=2, poison=True),
      "normal": _split(60, 8, boxes=2),
      "validation": coco_format.SplitSource(validation.annotations, read),
  }, data_dir=folder, strict=True)
  return folder


def guard_config(data_dir, **train_overrides):
  c = synthetic.get_config()
  c.data.name, c.data.data_dir = "guards", data_dir
  c.data.train_split, c.data.eval_split = MIXED, "validation"
  c.data.train_min_size_range = (SIZE, SIZE)
  c.data.eval_min_size = c.data.max_size = c.data.image_size = SIZE
  c.data.pad_multiple, c.data.max_boxes = 64, 4
  c.data.shuffle_buffer, c.data.num_parallel_calls, c.data.prefetch = 32, 1, 1
  c.model.backbone, c.model.fpn_channels, c.model.head_num_convs = "resnet18", 32, 1
  c.model.freeze_at = 5  # FPN and heads train; compiles and steps ~3x faster on CPU
  c.model.norm = "group_norm"  # pinned: a frozen sync_bn would become an identity frozen_bn
  c.model.num_classes = 3
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 4, 10, 0
  c.train.log_every, c.train.checkpoint_every, c.train.keep_checkpoints = 1, 10, 1
  c.eval.batch_size, c.eval.num_images_png = 4, 0
  c.eval.score_threshold = 0.001  # an untrained head scores ~0.01: detections of every class
  for key, value in train_overrides.items():
    c.train[key] = value
  return c


def _poisoning_resize(monkeypatch):
  original = transforms._resize  # pylint: disable=protected-access

  def resize(image, hw):
    out = original(image, hw)
    poisoned = tf.reduce_all(tf.equal(image, POISON))
    return tf.where(poisoned, tf.fill(tf.shape(out), math.nan), out)

  monkeypatch.setattr(transforms, "_resize", resize)


def _records(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


# ----------------------------------------------------------------------------------------------
# Training guards: one run over the mixed split; each test checks the steps of its kind.


@pytest.fixture(scope="module")
def mixed_run(data_dir, tmp_path_factory):
  """Runs 10 steps on no_boxes+crowd+poison, then evaluates; replays the same input to learn
  what each step's batch held. Returns (workdir, summary, batches)."""
  config = guard_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("mixed") / "run")
  with pytest.MonkeyPatch.context() as mp:
    _poisoning_resize(mp)
    summary = train.train_and_evaluate(config, workdir)
    replay = data_lib.make_train_input(config.data, global_batch_size=4, mesh=None)
    batches = [replay.next_numpy() for _ in range(config.train.steps)]
  return workdir, summary, batches


def _train_records(workdir):
  return {r["step"]: r for r in _records(workdir) if "train/loss" in r}


def test_batches_without_a_valid_box_train_on_with_a_finite_loss(mixed_run):
  workdir, summary, batches = mixed_run
  records = _train_records(workdir)
  assert summary["step"] == 10 and sorted(records) == list(range(1, 11))
  empty = [s for s, b in enumerate(batches, 1) if not (b["box_mask"] & ~b["is_crowd"]).any()]
  assert empty, "no batch without a valid box in this run: change the data seed"
  for s in empty:
    r = records[s]
    assert np.isfinite(r["train/loss"]) and r["train/loss"] > 0, r
    assert r["train/num_positives"] == 0 and r["train/box_loss"] == 0, r
    assert np.isfinite(r["train/grad_norm"]), r
  assert all(np.isfinite(r["train/loss"]) for r in records.values())


def test_images_whose_boxes_are_all_crowd_give_no_positives_and_a_finite_loss(mixed_run):
  workdir, _, batches = mixed_run
  records = _train_records(workdir)
  crowd_only = [s for s, b in enumerate(batches, 1)
                if (b["box_mask"] & b["is_crowd"]).any() and not (b["box_mask"] & ~b["is_crowd"]).any()]
  assert crowd_only, "no batch whose boxes are all crowd in this run: change the data seed"
  for s in crowd_only:
    assert np.isfinite(records[s]["train/loss"]) and records[s]["train/num_positives"] == 0
  # The crowd boxes reached the loss (they are in the batch, flagged), they were not dropped.
  assert sum(int((b["box_mask"] & b["is_crowd"]).sum()) for b in batches) > 0


def test_images_turned_to_nan_are_zeroed_counted_and_logged(mixed_run):
  workdir, summary, batches = mixed_run
  records = _train_records(workdir)
  poisoned = [(s, i) for s, b in enumerate(batches, 1) for i, image_id in enumerate(b["image_id"])
              if 40 <= image_id < 44]
  assert poisoned
  for s, i in poisoned:
    assert not batches[s - 1]["image"][i].any()  # NaN pixels became 0, the image stayed
    assert batches[s - 1]["box_mask"][i].sum() == 2  # with its boxes
    assert np.isfinite(records[s]["train/loss"]) and records[s]["train/num_positives"] > 0
  assert summary["input"]["nonfinite_images"] == len(poisoned)
  assert summary["input"]["nonfinite_pixels"] == len(poisoned) * SIZE * SIZE * 3
  log = open(os.path.join(workdir, "log.txt")).read()
  warned = [int(n) for n in re.findall(r"Warning: (\d+) training images had non-finite pixels", log)]
  assert sum(warned) == len(poisoned)
  assert f"{len(poisoned)} images with non-finite pixels set to 0" in log


# ----------------------------------------------------------------------------------------------
# Divergence


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_only_finite_values(
    data_dir, tmp_path):
  # The paper's recipe (SGD, constant rate, smooth L1, no norm in the heads) at learning rate 100:
  # weights and activations grow geometrically until they overflow. (With GroupNorm heads, GIoU and
  # a cosine decay, as in configs/synthetic.py, the loss saturates near 300 and stays finite.)
  config = guard_config(data_dir, optimizer="sgd", base_lr=100.0, grad_clip_norm=0.0,
                        schedule="step", decay_steps=(), checkpoint_every=1, keep_checkpoints=100,
                        steps=30)
  config.model.head_norm, config.loss.box_loss = "none", "smooth_l1"
  config.data.train_split = "normal"
  config.eval.at_end = False
  workdir = str(tmp_path / "run")
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  print(message)
  bad = int(re.search(r"not finite at step (\d+)", message).group(1))
  losses = {r["step"]: r["train/loss"] for r in _records(workdir) if "train/loss" in r}
  assert sorted(losses) == list(range(1, bad)) and all(np.isfinite(list(losses.values())))
  steps = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
  assert sorted(steps) == list(range(1, bad))  # every finite step was saved, the bad one never
  if bad > 1:
    assert f"the last good checkpoint is step {bad - 1} in {workdir}/checkpoints" in message
  else:
    assert "no checkpoint has been written yet" in message
  assert f"Stopping: the loss or its gradient was not finite at step {bad}" in open(
      os.path.join(workdir, "log.txt")).read()
  for s in steps:
    with ocp.StandardCheckpointer() as ckpt:
      saved = {item: ckpt.restore(os.path.join(workdir, "checkpoints", str(s), item))
               for item in ("model", "optimizer")}
    assert int(saved["optimizer"]["nonfinite_step"]) == -1
    for leaf in jax.tree.leaves(saved):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), s


# ----------------------------------------------------------------------------------------------
# Evaluation guards


def test_evaluation_with_a_category_without_ground_truth_and_images_without_annotations(mixed_run):
  workdir, summary, _ = mixed_run
  metrics = summary["metrics"]
  assert set(metrics) == set(evaluation.METRIC_NAMES) | set(counting.METRIC_NAMES)
  assert all(isinstance(metrics[n], float) and -1 <= metrics[n] <= 1 for n in evaluation.METRIC_NAMES)
  assert metrics["count_mae"] >= 0 and metrics["count_threshold_chosen"] == 1.0
  assert metrics["AP"] >= 0  # defined: categories 1 and 2 have ground truth
  detections = json.load(open(os.path.join(workdir, "detections_10.json")))
  assert 3 in {d["category_id"] for d in detections}  # detections of the category without truth
  assert {204, 205, 206, 207} <= {d["image_id"] for d in detections}  # and of unannotated images
  assert "Evaluation at step 10 (8 images" in open(os.path.join(workdir, "log.txt")).read()


@pytest.fixture(scope="module")
def blind_model(data_dir):
  """A fresh model and an eval step whose score threshold no score reaches: no detections."""
  config = guard_config(data_dir)
  config.eval.score_threshold = 1.01
  config.eval.batch_size = 4
  config = config_lib.Config.from_config_dict(config)
  mesh = mesh_lib.make_mesh()
  setup = train_state.create_train_state(config, mesh)
  description = train_state.describe(config, data_lib.label_map(config.data))
  return config, mesh, setup, description


def _evaluate(blind_model, split):
  config, mesh, setup, description = blind_model
  data = dataclasses.replace(config.data, eval_split=split)
  evaluator = evaluator_lib.Evaluator.for_data(data, eval_config=config.eval,
                                               graphdef=setup.eval_graphdef,
                                               description=description, mesh=mesh)
  return evaluator.run(setup.state.params, setup.state.rest)


def test_evaluation_without_any_detection_gives_zeros(blind_model):
  metrics, detections = _evaluate(blind_model, "validation")
  assert detections == []
  assert {n: metrics[n] for n in evaluation.METRIC_NAMES} == {n: 0.0 for n in evaluation.METRIC_NAMES}
  assert metrics["count_mae"] > 0  # every count is 0, below the ground truth's


def test_evaluation_of_a_split_without_annotations_gives_undefined_not_an_error(blind_model):
  metrics, detections = _evaluate(blind_model, "no_boxes")
  assert detections == []
  assert {n: metrics[n] for n in evaluation.METRIC_NAMES} == {n: -1.0 for n in evaluation.METRIC_NAMES}
  assert metrics["count_mae"] == metrics["count_rmse"] == 0.0  # 0 counted, 0 there
  assert "n/a" in evaluation.format_table(metrics)
