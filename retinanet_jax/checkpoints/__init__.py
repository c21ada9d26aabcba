"""Saved models: what a checkpoint says about its model (`model_description`), its state as a pure
dict (`model_state`), finding, reading and writing saved models (`storage`: `load_model`,
`read_model_state`, `save_model`, `locate`), the import of torchvision and detectron2 weights
(`weights`) and the errors of all of them (`errors`, exit code 4).

    from retinanet_jax import checkpoints
    loaded = checkpoints.load_model("runs/r50")     # a run, one of its steps, or converted weights

A training run's own checkpoint manager (optimizer state, input positions, damaged steps set aside)
is training's: `retinanet_jax.training.run_checkpoints.Checkpoints`.
"""

from retinanet_jax.checkpoints.errors import CheckpointError, DamagedCheckpointError
from retinanet_jax.checkpoints.model_description import Geometry, ModelDescription
from retinanet_jax.checkpoints.model_state import load_into, model_state_dict, split_model_state
from retinanet_jax.checkpoints.storage import (DESCRIPTION_FILE, LoadedModel, Location, load_model,
                                               locate, read_model_state, save_model)

__all__ = ["CheckpointError", "DESCRIPTION_FILE", "DamagedCheckpointError", "Geometry",
           "LoadedModel", "Location", "ModelDescription", "load_into", "load_model", "locate",
           "model_state_dict", "read_model_state", "save_model", "split_model_state"]
