"""Saved models on disk: their layouts, one loader for every kind, and the writer of converted ones.

Layouts (all self-describing: `model_description.ModelDescription` says how to rebuild the model):

  training run   `workdir/checkpoints/<step>/` with three Orbax items: `model` (the whole model
                 state as a pure dict, `nnx.to_pure_dict(nnx.state(model))`), `optimizer` (step,
                 optax state, loss-normalizer EMA, non-finite guard) and `description` (JSON);
                 plus each host's input-iterator position in `workdir/input_state/<step>/`.
  converted      `DIR/model/` (the same pure dict, Orbax) and `DIR/description.json`
                 (scripts/convert_weights.py; ImageNet backbones hold the `backbone` subtree only).
  first release  converted: `DIR/state/` + `DIR/metadata.json` (format 1): still loaded.
                 training: `<step>/default` (one TrainState item, no description): needs the
                 training config once, `python scripts/upgrade_checkpoint.py --config=CONFIG
                 --checkpoint=OLD_RUN --output=NEW_RUN` writes the current layout into a new folder.

`load_model(path)` reads any of them (a workdir, its `checkpoints/`, one step's folder, or a
converted directory) and returns the model for inference without touching the optimizer state;
`read_model_state(path)` returns the pure dict and description (for `init_from`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from retinanet_jax.checkpoints import model_description as description_lib
from retinanet_jax.checkpoints import model_state
from retinanet_jax.checkpoints.errors import CheckpointError, DamagedCheckpointError, first_line

DESCRIPTION_FILE = "description.json"
LEGACY_METADATA_FILE = "metadata.json"


# ----------------------------------------------------------------------------------------------
# Converted models


def save_model(path: str, state: dict, description: description_lib.ModelDescription) -> None:
  """Writes a converted model: `state` (a pure dict) to `path/model`, the description to
  `path/description.json`."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, "model"), state, force=True)
  with open(os.path.join(path, DESCRIPTION_FILE), "w") as f:
    json.dump(description.to_json(), f, indent=2)


# ----------------------------------------------------------------------------------------------
# One loader


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a saved model's two parts are: the state folder and the description (file or item)."""

  state_dir: str
  description: description_lib.ModelDescription
  step: Optional[int]


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None


def _step_folder(path: str) -> tuple[str, int]:
  """`(step folder, step)` for a workdir, its checkpoints folder, or one step's folder."""
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(path):
    return path, int(base)
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate):
      steps = [int(n) for n in os.listdir(candidate)
               if n.isdigit() and os.path.isdir(os.path.join(candidate, n))]
      if steps:
        return os.path.join(candidate, str(max(steps))), max(steps)
  raise CheckpointError(
      f"{path} is not a saved model: no {DESCRIPTION_FILE} (converted weights), no "
      f"checkpoints/<step> (a training run) and not a step folder")


def locate(path: str) -> Location:
  """Finds the model state and description of `path` (module docstring's layouts)."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist")
  if os.path.isfile(os.path.join(path, DESCRIPTION_FILE)):
    where = os.path.join(path, DESCRIPTION_FILE)
    return Location(os.path.join(path, "model"),
                    description_lib.ModelDescription.from_json(_read_json(where), where=where), None)
  if os.path.isfile(os.path.join(path, LEGACY_METADATA_FILE)):  # converted, first release
    where = os.path.join(path, LEGACY_METADATA_FILE)
    return Location(os.path.join(path, "state"),
                    description_lib.ModelDescription.from_json(_read_json(where), where=where), None)
  folder, step = _step_folder(path)
  if os.path.isdir(os.path.join(folder, "default")):
    raise CheckpointError(
        f"{folder} is a checkpoint of the first release, which did not record its model; upgrade "
        f"it once: python scripts/upgrade_checkpoint.py --config=ITS_TRAINING_CONFIG "
        f"--checkpoint={path} --output=NEW_FOLDER")
  if not os.path.isdir(os.path.join(folder, "model")):
    raise CheckpointError(f"{folder} has no model item (an unfinished or damaged checkpoint?)")
  where = os.path.join(folder, "description")
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
      obj = checkpointer.restore(where)
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpointError(
        f"checkpoint step {step} in {folder} is damaged: its model description cannot be read "
        f"({first_line(e)}); use another step's folder (e.g. {os.path.dirname(folder)}/<step>)",
        path=folder, step=step) from e
  return Location(os.path.join(folder, "model"),
                  description_lib.ModelDescription.from_json(obj, where=where), step)


def _restore_numpy(state_dir: str, step: Optional[int] = None) -> dict:
  """A pure dict saved by Orbax, as NumPy arrays (whatever devices wrote it), int list keys. Raises
  `DamagedCheckpointError` when its files cannot be read back."""
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      tree = checkpointer.metadata(state_dir).item_metadata.tree
      as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                              is_leaf=lambda x: hasattr(x, "shape"))
      restored = checkpointer.restore(state_dir,
                                      args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  except Exception as e:  # pylint: disable=broad-except
    folder = os.path.dirname(state_dir)
    what = f"checkpoint step {step} in {folder}" if step is not None else f"the model in {folder}"
    hint = (f"; use an older step's folder ({os.path.dirname(folder)}/<step>) or rerun training "
            f"to set it aside" if step is not None else "")
    raise DamagedCheckpointError(f"{what} is damaged: its files cannot be read back "
                                 f"({first_line(e)}){hint}", path=folder, step=step) from e
  restored = nnx.restore_int_paths(restored)
  return traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(restored)).items()})


def read_model_state(path: str) -> tuple[dict, description_lib.ModelDescription]:
  """`(pure state of NumPy arrays, description)` of any saved model (`locate`)."""
  location = locate(path)
  return _restore_numpy(location.state_dir, location.step), location.description


@dataclasses.dataclass
class LoadedModel:
  """A model ready for inference (evaluation mode), split as the eval step takes it."""

  graphdef: Any
  params: Any
  rest: Any
  description: description_lib.ModelDescription
  step: Optional[int]

  def module(self):
    return nnx.merge(self.graphdef, self.params, self.rest)


def load_model(path: str, *, dtype: Optional[str] = None) -> LoadedModel:
  """The model saved at `path` (any layout of the module docstring) in evaluation mode; reads the
  model item only (never the optimizer state). `dtype` overrides the computation dtype."""
  location = locate(path)
  if location.description.kind != "retinanet":
    raise CheckpointError(f"{path} holds a {location.description.kind} only, not a detector "
                          f"(use it as --config.init_from with init_mode='backbone')")
  model = location.description.build_abstract_model(dtype=dtype)
  model_state.load_into(model, _restore_numpy(location.state_dir, location.step))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return LoadedModel(graphdef, params, rest, location.description, location.step)

