"""Checkpoints: a training step's items, the model restored alone (no optimizer state), converted
weights and the first release's layouts through the one loader, and the upgrade of old runs."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import synthetic
from retinanet_jax import checkpoints
from retinanet_jax import config as config_lib
from retinanet_jax.data import labels as labels_lib
from retinanet_jax.runtime import mesh as mesh_lib
from retinanet_jax.training import run_checkpoints, train_state

LABELS = labels_lib.LabelMap(tuple(range(1, 7)), tuple(f"class{i}" for i in range(6)))


@pytest.fixture(scope="module")
def setup():
  c = synthetic.get_config()
  c.model.backbone, c.model.fpn_channels, c.model.head_num_convs = "resnet18", 32, 1
  config = config_lib.Config.from_config_dict(c)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  made = train_state.create_train_state(config, mesh)
  # A state that is not the initial one: the step, the optimizer and the EMA all differ.
  state = dataclasses.replace(
      made.state, step=made.state.step + 7, normalizer=made.state.normalizer * 0.5,
      opt_state=jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, made.state.opt_state))
  return config, mesh, made, state


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def _save_run(tmp_path, config, state, step=7):
  workdir = str(tmp_path / "run")
  manager = run_checkpoints.Checkpoints(workdir, keep=2,
                                    description=train_state.describe(config, LABELS))
  manager.save(step, state, None)
  manager.close()
  return workdir


def test_a_step_holds_model_optimizer_and_description_and_restores_exactly(setup, tmp_path):
  config, _, made, state = setup
  workdir = _save_run(tmp_path, config, state)
  assert {"description", "model", "optimizer"} <= set(
      os.listdir(os.path.join(workdir, "checkpoints", "7")))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          made.state)
  restored = run_checkpoints.Checkpoints(workdir, keep=2).restore(7, abstract, None)
  _assert_same(restored, state)
  assert int(restored.step) == 7


def test_the_model_restores_without_optimizer_state(setup, tmp_path):
  config, _, _, state = setup
  workdir = _save_run(tmp_path, config, state)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "7", "optimizer"))  # proves it is never read
  for path in (workdir, os.path.join(workdir, "checkpoints"), os.path.join(workdir, "checkpoints", "7")):
    loaded = checkpoints.load_model(path)
    assert loaded.step == 7 and loaded.description.label_map == LABELS
    assert loaded.description.model == config.model and loaded.description.anchors == config.anchors
    _assert_same(loaded.params, state.params)
    _assert_same(loaded.rest, state.rest)
    assert loaded.description.source == {"format": "training", "step": 7}


def test_converted_weights_of_the_first_release_still_load(setup, tmp_path):
  """format_version 1: `state/` + `metadata.json` whose model config holds conv_kernel_gradient."""
  config, _, _, state = setup
  pure = checkpoints.model_state_dict(state.params, state.rest)
  path = str(tmp_path / "old_converted")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, "state"), jax.tree.map(np.asarray, pure))
  metadata = {"format_version": 1, "kind": "retinanet",
              "model": {**config.model.to_dict(), "conv_kernel_gradient": "auto"},
              "input_convention": "torchvision", "anchors": dataclasses.asdict(config.anchors),
              "num_classes": 6, "label_map": {"category_ids": list(LABELS.category_ids),
                                              "names": list(LABELS.names)},
              "source": {"format": "torchvision_v1", "file": "x.pth", "class_mapping": "keep"}}
  with open(os.path.join(path, "metadata.json"), "w") as f:
    json.dump(metadata, f)
  loaded = checkpoints.load_model(path)
  assert loaded.step is None and loaded.description.label_map == LABELS
  _assert_same(loaded.params, state.params)


def test_training_runs_of_the_first_release_are_upgraded_into_a_new_folder(setup, tmp_path):
  config, mesh, made, state = setup
  old = tmp_path / "old_run"
  with ocp.CheckpointManager(str(old / "checkpoints")) as manager:  # the first release's layout
    manager.save(7, args=ocp.args.StandardSave(dataclasses.replace(state, divergence=None)))
  os.makedirs(old / "input_state" / "7")
  (old / "input_state" / "7" / "process_0.json").write_text("{}")
  labels_lib.save_label_map(LABELS, str(old / "label_map.json"))
  with pytest.raises(checkpoints.CheckpointError, match="upgrade_checkpoint.py"):
    checkpoints.load_model(str(old))
  with pytest.raises(checkpoints.CheckpointError, match="upgrade_checkpoint.py"):
    run_checkpoints.Checkpoints(str(old), keep=2)
  new = str(tmp_path / "new_run")
  assert run_checkpoints.upgrade_legacy_run(str(old), new, config) == [7]
  assert os.path.isfile(os.path.join(new, "input_state", "7", "process_0.json"))
  loaded = checkpoints.load_model(new)
  _assert_same(loaded.params, state.params)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          made.state)
  upgraded = run_checkpoints.Checkpoints(new, keep=2).restore(7, abstract, None)
  _assert_same(dataclasses.replace(upgraded, divergence=None),
               dataclasses.replace(state, divergence=None))
  _assert_same(upgraded.divergence, train_state.initial_divergence_state(
      config.train.divergence_window))  # the first release had no divergence guard
  assert config_lib.load_run_config(new) == dataclasses.replace(config, runtime=config.runtime)
  with pytest.raises(checkpoints.CheckpointError, match="not empty"):
    run_checkpoints.upgrade_legacy_run(str(old), new, config)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
    checkpoints.load_model(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(checkpoints.CheckpointError, match="not a saved model"):
    checkpoints.load_model(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints (the end-to-end runs are in tests/test_failures.py)


class _Position:
  """A training input's stand-in: its position is one JSON file per step folder."""

  def __init__(self, batches=0):
    self.batches = batches

  def save_state(self, path):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "position.json"), "w") as f:
      json.dump({"batches": self.batches}, f)

  def restore_state(self, path):
    with open(os.path.join(path, "position.json")) as f:
      self.batches = json.load(f)["batches"]


def truncate_largest_array_file(step_folder, item="model"):
  """Cuts the largest array data file of a step's `item` to 1000 bytes (a copy cut short)."""
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_folder, item))
           for n in names if os.sep + "d" + os.sep in os.path.join(d, n)]
  largest = max(files, key=os.path.getsize)
  assert os.path.getsize(largest) > 1000
  with open(largest, "r+b") as f:
    f.truncate(1000)
  return largest


@pytest.fixture
def two_steps(setup, tmp_path):
  """A run with checkpoints 3 and 7 (different states) and their input positions."""
  config, _, made, state = setup
  workdir = str(tmp_path / "run")
  manager = run_checkpoints.Checkpoints(workdir, keep=5,
                                    description=train_state.describe(config, LABELS))
  manager.save(3, dataclasses.replace(state, step=state.step - 4), _Position(3))
  manager.save(7, state, _Position(7))
  manager.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          made.state)
  return workdir, abstract, state


def test_a_truncated_array_file_falls_back_to_the_previous_step_and_is_kept_aside(two_steps):
  workdir, abstract, state = two_steps
  truncate_largest_array_file(os.path.join(workdir, "checkpoints", "7"))
  with pytest.raises(checkpoints.DamagedCheckpointError, match="step 7") as error:
    checkpoints.load_model(os.path.join(workdir, "checkpoints", "7"))  # evaluate.py, detect.py
  assert error.value.exit_code == 4 and "OUT_OF_RANGE" in str(error.value)
  manager = run_checkpoints.Checkpoints(workdir, keep=5)
  with pytest.raises(checkpoints.DamagedCheckpointError) as error:  # policy 'stop'
    manager.restore_newest(abstract, _Position(), _Position, on_damaged="stop", log=print)
  assert f"checkpoint step 7 in {workdir}/checkpoints/7 is damaged" in str(error.value)
  assert "nothing was moved" in str(error.value) and manager.latest_step() == 7
  lines = []
  step, restored, position = manager.restore_newest(abstract, _Position(), _Position,
                                                    on_damaged="fall_back", log=lines.append)
  assert (step, position.batches, int(restored.step)) == (3, 3, int(state.step) - 4)
  _assert_same(restored.params, state.params)
  assert sorted(os.listdir(os.path.join(workdir, "damaged"))) == ["checkpoint_7", "input_state_7"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  (line,) = lines
  assert line.startswith(f"Warning: checkpoint step 7 in {workdir}/checkpoints/7 is damaged")
  assert f"moved, not deleted, to {workdir}/damaged/checkpoint_7 and " in line
  assert "resuming from the previous checkpoint, step 3" in line
  manager.close()


def test_a_damaged_input_position_falls_back_and_a_mismatched_model_is_not_damage(setup, two_steps):
  workdir, abstract, state = two_steps
  with open(os.path.join(workdir, "input_state", "7", "position.json"), "w") as f:
    f.write('{"batch')  # cut short
  manager = run_checkpoints.Checkpoints(workdir, keep=5)
  lines = []
  step, _, position = manager.restore_newest(abstract, _Position(), _Position,
                                             on_damaged="fall_back", log=lines.append)
  assert (step, position.batches) == (3, 3)
  assert "the input-iterator position of checkpoint step 7" in lines[0]
  assert os.path.isfile(os.path.join(workdir, "damaged", "input_state_7", "position.json"))
  # Another model's checkpoint reads fine but does not fit: an error, and nothing is moved.
  config = setup[0]
  other = config_lib.Config.from_config_dict(dataclasses.replace(
      config, model=dataclasses.replace(config.model, fpn_channels=64)))
  other_abstract = train_state.create_train_state(other, setup[1], abstract=True).state
  with pytest.raises(checkpoints.CheckpointError, match="written by another model") as error:
    manager.restore_newest(other_abstract, _Position(), _Position, on_damaged="fall_back",
                           log=lines.append)
  assert not isinstance(error.value, checkpoints.DamagedCheckpointError)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"] and len(lines) == 1
  manager.close()
