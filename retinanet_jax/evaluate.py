"""Evaluate a trained or converted RetinaNet on a config's evaluation split (scripts/evaluate.py).

Two kinds of checkpoint load here:
  * a training run's Orbax checkpoint: the run's `workdir`, its `workdir/checkpoints`, or one step's
    `workdir/checkpoints/<step>`; the network and anchors come from `config`;
  * a converted checkpoint (scripts/convert_weights.py, a directory with `metadata.json`): the network,
    anchors, input normalization and class -> category-id map come from its metadata (torchvision's
    COCO models predict 91 classes indexed by COCO category id), so the same COCO evaluation applies.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import evaluation
from retinanet_jax import train
from retinanet_jax import weights


@dataclasses.dataclass
class LoadedModel:
  """What inference needs: split model state, anchors, normalization, classes -> category ids."""

  graphdef: Any
  params: Any
  rest: Any
  anchor_config: anchor_lib.AnchorConfig
  input_convention: str
  category_ids: list[int]
  names: list[str]
  step: int | None


def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "metadata.json"))


def _training_step_dir(path: str) -> tuple[str, int]:
  """`(directory of one step, step)` for a workdir, its checkpoints folder or one step's folder."""
  path = os.path.abspath(path)
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate):
      steps = [int(n) for n in os.listdir(candidate) if n.isdigit()]
      if steps and candidate.endswith("checkpoints"):
        return os.path.join(candidate, str(max(steps))), max(steps)
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, "default")):
    return path, int(base)
  raise ValueError(f"{path} is neither a converted checkpoint (no metadata.json) nor a training "
                   f"run's checkpoint (no checkpoints/<step> or <step>/default inside)")


def load_model(config: ml_collections.ConfigDict, checkpoint: str, *, label_map=None) -> LoadedModel:
  """Loads `checkpoint` (either kind, module docstring) for inference, in evaluation mode."""
  if is_converted(checkpoint):
    model, metadata = weights.restore_model(checkpoint)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return LoadedModel(graphdef, params, rest, weights.anchor_config_from_metadata(metadata),
                       metadata["input_convention"], list(metadata["label_map"]["category_ids"]),
                       list(metadata["label_map"]["names"]), None)
  step_dir, step = _training_step_dir(checkpoint)
  model = train.create_model(config, seed=config.seed)
  tx = train.make_optimizer(config.train)
  _, state = train.initial_state(model, tx, config)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.join(step_dir, "default"), abstract)
  model.eval()
  graphdef = nnx.graphdef(model)
  if label_map is None:
    raise ValueError("a training checkpoint needs the dataset's label map")
  return LoadedModel(graphdef, restored.params, restored.rest, train.anchor_config(config),
                     config.input_convention, list(label_map.category_ids), list(label_map.names),
                     step)


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, *,
                        output_dir: str | None = None) -> dict[str, float]:
  """COCO metrics of `checkpoint` on `config.data.eval_split`; writes `eval_<step|converted>.json`
  and the COCO results into `output_dir` when given."""
  from retinanet_jax import data as data_lib  # pylint: disable=import-outside-toplevel

  if config.data.name == "synthetic":
    data_lib.ensure_synthetic_dataset(config.data)
  labels = data_lib.label_map(config.data)
  loaded = load_model(config, checkpoint, label_map=labels)
  eval_config = ml_collections.ConfigDict(config.to_dict())
  eval_config.input_convention = loaded.input_convention
  mesh = train.make_mesh()
  eval_input = data_lib.make_eval_input(config.data, global_batch_size=config.eval.batch_size,
                                        mesh=mesh)
  image_hw = data_lib.padded_hw(data_lib.TransformConfig.from_data_config(config.data))
  anchor_set = anchor_lib.generate_anchors(image_hw, config=loaded.anchor_config)
  eval_fn = train.compile_eval_step(loaded.graphdef, anchor_set, eval_config, mesh)
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(loaded.params, replicated)
  rest = jax.device_put(loaded.rest, replicated)
  ground_truth = data_lib.coco_ground_truth(config.data)
  metrics, detections = train.evaluate(eval_fn, params, rest, eval_input,
                                       ground_truth=ground_truth,
                                       category_ids=loaded.category_ids)
  if output_dir and jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    tag = "converted" if loaded.step is None else str(loaded.step)
    evaluation.write_metrics(os.path.join(output_dir, f"eval_{tag}.json"), metrics,
                             checkpoint=os.path.abspath(checkpoint),
                             num_detections=len(detections))
  return metrics
