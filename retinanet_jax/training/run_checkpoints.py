"""A training run's checkpoints: the Orbax manager of model, optimizer and description items, each
host's input-iterator position, damaged checkpoints set aside, and the upgrade of the first release's
runs. Saved models are read by `checkpoints.load_model` (retinanet_jax/checkpoints/storage.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from retinanet_jax.checkpoints import model_description as description_lib
from retinanet_jax.checkpoints.errors import CheckpointError, DamagedCheckpointError, first_line
from retinanet_jax.checkpoints.model_state import model_state_dict, split_model_state
from retinanet_jax import config as config_lib
from retinanet_jax.data import labels as labels_lib
from retinanet_jax.runtime import mesh as mesh_lib
from retinanet_jax.training import train_state as train_state_lib
from retinanet_jax.training.train_state import TrainState


def _gfile():
  """`tf.io.gfile` (local paths and buckets alike), imported on first use: importing the training
  package costs no TensorFlow start-up."""
  import tensorflow as tf  # heavy, see the docstring  # pylint: disable=import-outside-toplevel
  return tf.io.gfile


ITEMS = ("model", "optimizer", "description")


def _optimizer_item(state: TrainState, *, divergence: bool = True) -> dict:
  item = {"step": state.step, "opt_state": state.opt_state, "normalizer": state.normalizer,
          "nonfinite_step": state.nonfinite_step}
  if divergence:  # absent from checkpoints written before the divergence guard
    item["divergence"] = state.divergence
  return item


def _saved_shapes(item_dir: str) -> list[tuple]:
  """The array shapes of an Orbax item (metadata only: no array is read), in tree order."""
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(item_dir).item_metadata.tree
  return [tuple(x.shape) for x in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))]


def _saved_keys(item_dir: str) -> set:
  """The top-level keys of an Orbax item that hold something (metadata only)."""
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(item_dir).item_metadata.tree
  return {k for k, v in tree.items() if jax.tree.leaves(v, is_leaf=lambda x: hasattr(x, "shape"))}


# ----------------------------------------------------------------------------------------------
# The training run's manager


class Checkpoints:
  """Orbax `CheckpointManager` of a run (items `model`, `optimizer`, `description`), plus each
  host's input-iterator position.

  Restoring (`restore_newest`): a checkpoint whose files cannot be read back (truncated, cut short,
  corrupted; or its input position) is damaged; by `on_damaged` it stops the run
  (`DamagedCheckpointError`) or is moved to `workdir/damaged/` (never deleted) and the next older
  one is tried. A checkpoint that reads but does not fit the model (another config) is not damaged:
  `CheckpointError`, nothing moved.

  A step's input positions are written (under `workdir/input_state/<step>/`) by every host, then all
  hosts meet at a barrier, then its Orbax checkpoint starts (asynchronously: the arrays are copied to
  host memory before `save` returns, so the next step may donate them). Orbax commits a checkpoint
  atomically (written under `<step>.orbax-checkpoint-tmp`, renamed to `<step>` when complete), and
  lists only committed ones, so a checkpoint being written when the process dies is never loaded:
  restore takes the previous complete one, whose input positions were complete before it began.
  Leftovers of a killed save (Orbax's temporary folder, input positions of uncommitted steps) are
  deleted when the next run starts. Checkpoints are written once (Orbax coordinates the hosts) and
  hold global arrays, restorable on any number of processes and devices.
  """

  def __init__(self, workdir: str, *, keep: int,
               description: Optional[description_lib.ModelDescription] = None):
    self.directory = os.path.join(workdir, "checkpoints")
    self.input_directory = os.path.join(workdir, "input_state")
    self.damaged_directory = os.path.join(workdir, "damaged")
    self.description = description
    self._remove_unfinished_saves()
    legacy = _legacy_steps(self.directory)
    if legacy:
      raise CheckpointError(
          f"{self.directory} holds checkpoints of the first release (step {max(legacy)}/default). "
          f"Upgrade the run once into a new folder, then resume there: python "
          f"scripts/upgrade_checkpoint.py --config=YOUR_CONFIG --checkpoint={workdir} "
          f"--output=NEW_WORKDIR")
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=False))
    self._remove_input_states(keep_below=None)

  def _remove_unfinished_saves(self) -> None:
    """Process 0 deletes Orbax's temporary folders of saves that never committed; all hosts wait.

    Done here, before anything else runs, rather than by Orbax's `cleanup_tmp_directories`, which
    deletes them in a background thread that nothing waits for: its listing of the folder then
    overlapped whatever the main thread did next (in tests, TFDS's mocked file system, which is
    process-wide, made that listing fail at random).
    """
    if jax.process_index() == 0 and _gfile().isdir(self.directory):
      for tmp in ocp.utils.tmp_checkpoints(self.directory):  # TemporaryPath objects (Orbax 0.12)
        _gfile().rmtree(os.fspath(tmp.get()))
    multihost_utils.sync_global_devices("checkpoints_unfinished_saves_removed")

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def describe(self) -> str:
    step = self.latest_step()
    if step is None:
      return "no checkpoint has been written yet"
    return f"the last good checkpoint is step {step} in {self.directory}"

  def save(self, step: int, state: TrainState, train_input) -> None:
    """Saves `step` (asynchronously); `train_input=None` saves no input position."""
    if self.description is None:
      raise ValueError("Checkpoints(description=...) is needed to save")
    if train_input is not None:
      train_input.save_state(os.path.join(self.input_directory, str(step)))
    multihost_utils.sync_global_devices(f"input_state_{step}")
    description = dataclasses.replace(self.description,
                                      source={"format": "training", "step": int(step)})
    self.manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model_state_dict(state.params, state.rest)),
        optimizer=ocp.args.StandardSave(_optimizer_item(state)),
        description=ocp.args.JsonSave(description.to_json())), force=True)
    self._remove_input_states(keep_below=step)

  def restore(self, step: int, abstract_state: TrainState, train_input) -> TrainState:
    """The state of `step`, shaped and sharded like `abstract_state` (`ShapeDtypeStruct`s), and
    `train_input`'s position. Raises `DamagedCheckpointError` when a file of the step cannot be read
    back, `CheckpointError` when the step holds another model's arrays."""
    folder = os.path.join(self.directory, str(step))
    model_target = model_state_dict(abstract_state.params, abstract_state.rest)
    optimizer_target = _optimizer_item(abstract_state)
    try:
      if "divergence" not in _saved_keys(os.path.join(folder, "optimizer")):
        optimizer_target = _optimizer_item(abstract_state, divergence=False)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(model_target),
          optimizer=ocp.args.StandardRestore(optimizer_target)))
    except Exception as e:  # pylint: disable=broad-except
      self._raise_mismatch(step, {"model": model_target, "optimizer": optimizer_target})
      raise DamagedCheckpointError(
          f"checkpoint step {step} in {folder} is damaged: its files cannot be read back "
          f"({first_line(e)})", path=folder, step=step) from e
    params, rest = split_model_state(restored["model"], abstract_state.params, abstract_state.rest)
    opt = restored["optimizer"]
    divergence = opt.get("divergence")
    if divergence is None:  # written before the divergence guard: it starts afresh
      divergence = jax.device_put(
          train_state_lib.initial_divergence_state(abstract_state.divergence["recent"].shape[0]),
          abstract_state.step.sharding)
    if train_input is not None:
      where = os.path.join(self.input_directory, str(step))
      try:
        train_input.restore_state(where)
      except Exception as e:  # pylint: disable=broad-except
        raise DamagedCheckpointError(
            f"the input-iterator position of checkpoint step {step} in {where} is damaged or "
            f"missing ({first_line(e)})", path=where, step=step) from e
    return TrainState(step=opt["step"], params=params, rest=rest, opt_state=opt["opt_state"],
                      normalizer=opt["normalizer"], nonfinite_step=opt["nonfinite_step"],
                      divergence=divergence)

  def _raise_mismatch(self, step: int, targets: dict) -> None:
    """Raises `CheckpointError` if step's items read (metadata only) but hold other shapes than
    `targets`; returns when they match or cannot be read (then the step is damaged)."""
    for item, target in targets.items():
      try:
        saved = _saved_shapes(os.path.join(self.directory, str(step), item))
      except Exception:  # pylint: disable=broad-except
        return
      wanted = [tuple(x.shape) for x in jax.tree.leaves(target)]
      if saved != wanted:
        first = next((i for i, (a, b) in enumerate(zip(saved, wanted)) if a != b),
                     min(len(saved), len(wanted)))
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} was written by another model or "
            f"optimizer than this config's: its {item!r} item holds {len(saved)} arrays, this "
            f"config {len(wanted)} (first difference: array {first}). Use the config the run "
            f"was started with, or another --workdir.")

  def restore_newest(self, abstract_state: TrainState, train_input, make_input: Callable[[], Any],
                     *, on_damaged: str, log: Callable[[str], None]):
    """`(step, state, train_input)` of the newest checkpoint that restores, or `(None, None,
    train_input)` when none does (or there is none): the run starts from scratch.

    `train_input` is the training input at its start, restored in place; `make_input()` builds
    another one like it, used after a damaged input position (which may have half-moved it). A damaged step (`restore`): `on_damaged='stop'` raises
    `DamagedCheckpointError`, naming the step and the folder; 'fall_back' logs one paragraph,
    moves the step's checkpoint and input position to `workdir/damaged/` and tries the next
    older step. All hosts take the same decision (a step is damaged if it is on any host).
    """
    while True:
      step = self.latest_step()
      if step is None:
        return None, None, train_input
      damage = None
      try:
        state = self.restore(step, abstract_state, train_input)
      except DamagedCheckpointError as e:
        damage = e
      if not _any_host(damage is not None):
        return step, state, train_input
      reason = str(damage) if damage is not None else (
          f"checkpoint step {step} in {self.directory} could not be restored on another host")
      if on_damaged == "stop":
        raise DamagedCheckpointError(
            f"{reason}. Stopping (train.on_damaged_checkpoint='stop'); nothing was moved. Rerun "
            f"with --config.train.on_damaged_checkpoint=fall_back to set it aside and resume "
            f"from the newest checkpoint that restores.", path=os.path.join(
                self.directory, str(step)), step=step) from damage
      moved = self.set_aside(step)
      older = [s for s in self.manager.all_steps() if s < step]
      log(f"Warning: {reason}. It was moved, not deleted, to {' and '.join(moved)}; "
          + (f"resuming from the previous checkpoint, step {max(older)}, if it restores."
             if older else "no older checkpoint is left: training starts from step 0."))
      train_input = make_input()

  def set_aside(self, step: int) -> list[str]:
    """Moves `step`'s checkpoint folder and input position (those that exist) into
    `workdir/damaged/` (process 0; all hosts wait); returns the new paths. Never deletes."""
    moved = []
    for folder, kind in ((self.directory, "checkpoint"), (self.input_directory, "input_state")):
      source = os.path.join(folder, str(step))
      target = os.path.join(self.damaged_directory, f"{kind}_{step}")
      n = 1
      while _gfile().exists(target):  # an earlier damaged copy of the same step stays too
        n += 1
        target = os.path.join(self.damaged_directory, f"{kind}_{step}-{n}")
      if _gfile().exists(source):
        moved.append(target)
        if jax.process_index() == 0:
          _gfile().makedirs(self.damaged_directory)
          _gfile().rename(source, target)
    multihost_utils.sync_global_devices(f"checkpoint_{step}_set_aside")
    self.manager.reload()
    return moved

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._remove_input_states(keep_below=None)

  def _remove_input_states(self, *, keep_below: Optional[int]) -> None:
    """Process 0 deletes the input positions of steps without a committed checkpoint (all of them,
    or only those below `keep_below`: a save of `keep_below` may still be in flight)."""
    if jax.process_index() != 0 or not _gfile().isdir(self.input_directory):
      return
    kept = set(ocp.utils.checkpoint_steps(self.directory))  # committed ones, from disk
    for name in _gfile().listdir(self.input_directory):
      name = name.rstrip("/")
      step = int(name) if name.isdigit() else None
      if step in kept or (keep_below is not None and (step is None or step >= keep_below)):
        continue
      _gfile().rmtree(os.path.join(self.input_directory, name))

  def close(self) -> None:
    self.wait()
    self.manager.close()



def _any_host(flag: bool) -> bool:
  """Whether `flag` is True on any process (a collective on several)."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return bool(np.asarray(flags).any())


def _legacy_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return [int(n) for n in os.listdir(directory)
          if n.isdigit() and os.path.isdir(os.path.join(directory, n, "default"))]



# ----------------------------------------------------------------------------------------------
# Checkpoints of the first release


def upgrade_legacy_run(old_workdir: str, new_workdir: str, config) -> list[int]:
  """Rewrites the first release's checkpoints of a run (`<step>/default`, one TrainState) into the
  current layout in `new_workdir` (which must not exist yet or be empty): every step, its input
  positions, `label_map.json` and `config.json`. `config` is the run's training config (a
  `config.Config` or `ConfigDict`): it gives the model the old checkpoints did not describe.
  Returns the steps written. `old_workdir` is only read."""
  config = config_lib.Config.from_config_dict(config)
  old_workdir, new_workdir = os.path.abspath(old_workdir), os.path.abspath(new_workdir)
  steps = sorted(_legacy_steps(os.path.join(old_workdir, "checkpoints")))
  if not steps:
    raise CheckpointError(f"{old_workdir}/checkpoints holds no checkpoint of the first release "
                          f"(<step>/default)")
  if os.path.exists(new_workdir) and os.listdir(new_workdir):
    raise CheckpointError(f"{new_workdir} exists and is not empty; give a new folder")
  label_path = os.path.join(old_workdir, "label_map.json")
  if not os.path.isfile(label_path):
    raise CheckpointError(f"{label_path} is missing: the run's label map names its classes")
  labels = labels_lib.load_label_map(label_path)
  mesh = mesh_lib.make_mesh()
  abstract = train_state_lib.create_train_state(config, mesh, abstract=True).state
  os.makedirs(new_workdir, exist_ok=True)
  checkpoints = Checkpoints(new_workdir, keep=len(steps),
                            description=train_state_lib.describe(config, labels))
  for step in steps:
    old_path = os.path.join(old_workdir, "checkpoints", str(step), "default")
    has_divergence = "divergence" in _saved_keys(old_path)  # the first release had no such guard
    with ocp.StandardCheckpointer() as checkpointer:
      state = checkpointer.restore(old_path, abstract if has_divergence else
                                   dataclasses.replace(abstract, divergence=None))
    if not has_divergence:
      state = dataclasses.replace(state, divergence=jax.device_put(
          train_state_lib.initial_divergence_state(config.train.divergence_window),
          state.step.sharding))
    checkpoints.save(step, state, None)
    checkpoints.wait()
    old_input = os.path.join(old_workdir, "input_state", str(step))
    if os.path.isdir(old_input):
      shutil.copytree(old_input, os.path.join(checkpoints.input_directory, str(step)))
  checkpoints.close()
  shutil.copy(label_path, os.path.join(new_workdir, "label_map.json"))
  with open(os.path.join(new_workdir, config_lib.RUN_CONFIG_FILE), "w") as f:
    json.dump(config.to_json(), f, indent=2)
  return steps

