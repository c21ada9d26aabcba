"""The training loop: a step on mock COCO, a short run that learns (then evaluated and run on image
files from its workdir alone), resume, and the non-finite guard. The step itself: test_train_step.py."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from configs import r50_fpn, synthetic
from retinanet_jax import checkpoints
from retinanet_jax import data as train_lib_data
from retinanet_jax.training import run_checkpoints, train
from scripts import detect as detect_script
from retinanet_jax.evaluation import evaluator

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
  with ocp.CheckpointManager(directory, item_names=("model",)) as manager:
    manager.save(2, args=ocp.args.Composite(model=ocp.args.StandardSave({"w": np.arange(3.0)})))
  unfinished = directory / "3.orbax-checkpoint-tmp-1795436005123456"
  unfinished.mkdir()
  (unfinished / "partial").write_text("cut off")
  manager = run_checkpoints.Checkpoints(str(tmp_path), keep=2)
  assert sorted(os.listdir(directory)) == ["2"]
  assert manager.latest_step() == 2


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
  # scripts/evaluate.py on the workdir alone (no config: the run's config.json gives the data, the
  # checkpoint's description the model) restores the model item only and gets the same numbers.
  again = evaluator.evaluate_saved_model(str(workdir), output_dir=str(tmp_path / "eval"))
  assert again == pytest.approx(summary["metrics"], abs=1e-6)
  assert os.path.isfile(tmp_path / "eval" / "eval_60.json")
  loaded = checkpoints.load_model(str(workdir / "checkpoints" / "60"))
  assert loaded.step == 60 and loaded.description.label_map == train_lib_data.label_map(config.data)
  # scripts/detect.py on the training workdir: no config either.
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image_path = tmp_path / "one.png"
  batch = next(iter(train_lib_data.make_eval_input(config.data, global_batch_size=8,
                                                   mesh=None).numpy_batches()))
  Image.fromarray(batch["image"][0]).save(image_path)
  results = detect_script.detect_files([str(image_path)], checkpoint=str(workdir),
                                       output=str(tmp_path / "detect"),
                                       min_size=SIZE, max_size=SIZE, size_divisible=64)
  assert os.path.isfile(tmp_path / "detect" / "one.detections.png")
  assert all(r["category_id"] in train_lib_data.label_map(config.data).category_ids for r in results)


def _restore_params(workdir, step):
  """The whole model state of checkpoint `step` (its `model` item), as NumPy."""
  return checkpoints.read_model_state(os.path.join(workdir, "checkpoints", str(step)))[0]


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


def test_sardet_recipe_smoke_variant_trains_on_synthetic_data(tmp_path):
  """configs/sardet_r50.py:smoke (fixed-size input without keeping the aspect ratio, AdamW), shrunk
  to the tiny network, on the synthetic data stretched from 64 to 96 px: it trains, evaluates with
  AP per class and maps the detections back to the 64 px originals."""
  import json  # pylint: disable=import-outside-toplevel
  from configs import sardet_r50  # pylint: disable=import-outside-toplevel
  c = tiny(sardet_r50.get_config("smoke"), tmp_path)
  c.data.name = "synthetic"
  s = c.data.synthetic
  s.image_size, s.num_train, s.num_validation, s.max_objects = SIZE, 16, 8, 3
  s.min_object_size, s.max_object_fraction = 12.0, 0.8
  c.data.image_size = 96
  c.data.max_boxes = 8
  c.model.freeze_at = 5  # backbone frozen: ~3x faster to compile (tests/helpers/tiny_config.py)
  c.eval.score_threshold = 0.0  # 2 steps from scratch score below 0.05: keep detections to map
  assert (c.data.mode, c.train.optimizer, c.train.steps) == ("fixed", "adamw", 2)
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["step"] == 2 and all(np.isfinite(v) for v in summary["metrics"].values())
  written = json.load(open(tmp_path / "run" / "eval_2.json"))
  assert [cat["name"] for cat in written["per_category"]][:2] == ["red_square", "green_circle"]
  detections = json.load(open(tmp_path / "run" / "detections_2.json"))
  assert detections and all(d["bbox"][0] + d["bbox"][2] <= SIZE + 1e-3 for d in detections)
