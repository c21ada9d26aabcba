"""The training state and the one function that builds it: `create_train_state(config, mesh)`.

Every caller that needs a model with its optimizer (training, the benchmark, tests) goes through
`create_train_state`: model from `config.model` (+ `config.runtime.conv_kernel_gradient`),
initial weights from `config.init_from`, optimizer and schedule from `config.train`, the state
replicated over the mesh. Inference needs none of this: `checkpoints.load_model(path)`.

The state is a plain pytree (`TrainState`): trainable parameters (`nnx.Param`), the rest of the model
state (frozen parameters, batch-norm statistics), the optax state, the step, the loss-normalizer EMA and
the first step whose loss was not finite (-1 while all are). Steps are pure functions of
`(graphdef, state, batch)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from retinanet_jax import config as config_lib
from retinanet_jax.checkpoints import model_description as description_lib
from retinanet_jax.checkpoints import model_state
from retinanet_jax.checkpoints import storage
from retinanet_jax.models import retinanet as retinanet_lib
from retinanet_jax.training import optimizer as optimizer_lib

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything a step reads and writes (a pytree; replicated over the mesh).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: `nnx.State` of the trainable `nnx.Param`s.
    rest: `nnx.State` of everything else in the model (frozen parameters, batch-norm statistics).
    opt_state: the optax state of `params`.
    normalizer: float32 scalar, the loss-normalizer EMA (unused with `loss.normalizer='batch'`).
    nonfinite_step: int32 scalar, the first step whose loss or gradient was not finite, or -1. Once
      set, steps leave the state unchanged, so no non-finite value is ever written to a checkpoint.
    divergence: the divergence guard's state (`initial_divergence_state`; train_step.py).
  """

  step: jax.Array
  params: Any
  rest: Any
  opt_state: Any
  normalizer: jax.Array
  nonfinite_step: jax.Array
  divergence: Any


def initial_divergence_state(window: int) -> dict:
  """The divergence guard's state before any step (`train_step.divergence_update`), as NumPy.

  recent: float32 `[window]`, the last finite losses in a ring (slots `>= seen` are empty, 0: a
  checkpoint holds finite values only); seen: int32, finite losses seen (the ring's next slot is
  `seen % window`); streak: int32, steps in a row above the
  threshold; streak_start, start_loss, start_median: the first step of that streak, its loss and
  the median it was compared with; episodes: int32, streaks that reached the patience (divergences);
  diverged_at, diverged_loss, diverged_median: those of the latest divergence's first step (-1, 0,
  0 while none); steps_above: int32, steps above the threshold in all.
  Every leaf is its own array (a state donated to the step must not hold one buffer twice).
  """
  i32 = lambda v: np.array(v, np.int32)  # a new array per call
  f32 = lambda v: np.array(v, np.float32)
  return {"recent": np.zeros((window,), np.float32), "seen": i32(0), "streak": i32(0),
          "streak_start": i32(-1), "start_loss": f32(0), "start_median": f32(0),
          "episodes": i32(0), "diverged_at": i32(-1), "diverged_loss": f32(0),
          "diverged_median": f32(0), "steps_above": i32(0)}


@dataclasses.dataclass
class TrainSetup:
  """What `create_train_state` returns.

  Attributes:
    graphdef: the model's graph in training mode (for `train_step`).
    eval_graphdef: the same model in evaluation mode (for the evaluator).
    state: the `TrainState`, replicated over the mesh (abstract `ShapeDtypeStruct`s with
      `abstract=True`).
    tx: the optax transformation; schedule: its learning-rate schedule.
    num_parameters: weights, trained or frozen; num_trained: trained ones.
  """

  graphdef: Any
  eval_graphdef: Any
  state: TrainState
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  num_parameters: int
  num_trained: int


def build_model(config: config_lib.Config, *, seed: Optional[int] = None) -> retinanet_lib.RetinaNet:
  """The RetinaNet of `config.model`, randomly initialized with `seed` (default `config.seed`)."""
  return retinanet_lib.build_model(config.model, rngs=nnx.Rngs(config.seed if seed is None else seed),
                                   kernel_gradient=config.runtime.conv_kernel_gradient)


def load_initial_weights(model: nnx.Module, config: config_lib.Config, path: str) -> str:
  """Copies the weights saved at `path` (any `checkpoints.load_model` layout) into `model`: the
  whole model or its backbone (`config.init_mode`). Returns a line for the log."""
  state, description = storage.read_model_state(path)
  if description.input_convention != config.input_convention:
    raise ValueError(f"{path} was trained with input_convention {description.input_convention!r} "
                     f"but the config says {config.input_convention!r}; set "
                     f"--config.input_convention to match")
  backbone_only = config.init_mode == "backbone"
  if not backbone_only and description.kind != "retinanet":
    raise ValueError(f"{path} holds a {description.kind} only; use init_mode='backbone'")
  model_state.load_into(model.backbone if backbone_only else model,
                    state["backbone"] if backbone_only else state)
  return f"Initialized {'backbone' if backbone_only else 'model'} from {path}"


def create_train_state(config: config_lib.Config, mesh: jax.sharding.Mesh, *,
                       init_from: Optional[str] = None, initial_weights: Optional[dict] = None,
                       abstract: bool = False,
                       log: Callable[[str], None] = lambda line: None) -> TrainSetup:
  """Model, initial weights, optimizer and replicated state of `config` (module docstring).

  Args:
    config: the typed config.
    mesh: the 1-D `'data'` mesh the state is replicated over.
    init_from: weights to start from (default `config.init_from`; '' or None: random).
    initial_weights: the whole model state as a pure dict (`nnx.to_pure_dict`), loaded instead of
      a random initialization (which is then skipped); overrides `init_from`.
    abstract: build shapes only (`nnx.eval_shape`: no initialization, nothing on device).
    log: receives the initialization line.
  """
  init_from = config.init_from if init_from is None else init_from
  if abstract or initial_weights is not None:
    model = nnx.eval_shape(lambda: build_model(config))
    if initial_weights is not None:
      model_state.load_into(model, initial_weights)
      abstract = False
  else:
    model = build_model(config)
    if init_from:
      log(load_initial_weights(model, config, init_from))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizer_lib.make_optimizer(config.train)
  opt_state = jax.eval_shape(tx.init, params) if abstract else tx.init(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=opt_state,
                     normalizer=jnp.asarray(config.loss.normalizer_init, jnp.float32),
                     nonfinite_step=jnp.full((), -1, jnp.int32),
                     divergence=initial_divergence_state(config.train.divergence_window))
  if abstract:
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         state)
  else:
    state = jax.device_put(state, NamedSharding(mesh, P()))
  model.eval()
  return TrainSetup(graphdef=graphdef, eval_graphdef=nnx.graphdef(model), state=state, tx=tx,
                    schedule=optimizer_lib.learning_rate_schedule(config.train),
                    num_parameters=retinanet_lib.count_parameters(model),
                    num_trained=sum(x.size for x in jax.tree.leaves(params)))


def describe(config: config_lib.Config, label_map) -> description_lib.ModelDescription:
  """The `ModelDescription` of the model `config` trains, with the dataset's `label_map`.

  Its geometry is the evaluation resize: data.mode 'resize' -> 'resize' (eval_min_size, max_size);
  'lsj' -> 'resize' fitting the image into image_size x image_size (LSJ's evaluation scale);
  'fixed' -> 'fixed' (stretched to image_size x image_size)."""
  d = config.data
  side = d.eval_min_size if d.mode == "resize" else d.image_size
  longest = d.max_size if d.mode == "resize" else d.image_size
  fixed = dict(mode="fixed", image_size=int(d.image_size)) if d.mode == "fixed" else {}
  return description_lib.ModelDescription(
      kind="retinanet", model=config.model, anchors=config.anchors,
      input_convention=config.input_convention, label_map=label_map,
      geometry=description_lib.Geometry(min_size=side, max_size=longest,
                                        pad_multiple=d.pad_multiple, **fixed),
      source={"format": "training"})
