"""A model's state as a pure dict of arrays (how every checkpoint stores it), and copying one into a
module (`load_into`: the one place that checks paths and shapes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util


def model_state_dict(params, rest) -> dict:
  """The whole model state, trainable and not, as one nested dict of arrays (int keys for lists)."""
  return nnx.to_pure_dict(nnx.merge_state(params, rest))


def split_model_state(pure: dict, params_template, rest_template):
  """`(params, rest)` shaped like the templates (`nnx.State`s), with the values of `pure`."""
  flat = traverse_util.flatten_dict(pure)
  flat = {tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path): v
          for path, v in flat.items()}
  out = []
  for template in (params_template, rest_template):
    paths = [tuple(p) for p, _ in nnx.to_flat_state(template)]
    part = jax.tree.map(lambda x: x, template)  # a copy to update
    nnx.replace_by_pure_dict(part, traverse_util.unflatten_dict({p: flat[p] for p in paths}))
    out.append(part)
  return tuple(out)



def load_into(module: nnx.Module, state: dict) -> None:
  """Copies the pure dict `state` into `module`'s variables as `jax.Array`s (same paths and shapes,
  any variable types: a frozen checkpoint loads into a trainable model and vice versa).

  `module` may be abstract (`nnx.eval_shape(lambda: build_model(...))`), which skips the random
  initialization."""
  model_state = nnx.state(module)
  ours = {tuple(p): v for p, v in nnx.to_flat_state(model_state)}
  theirs = traverse_util.flatten_dict(state)
  missing = sorted(str(p) for p in ours.keys() - theirs.keys())
  unexpected = sorted(str(p) for p in theirs.keys() - ours.keys())
  mismatched = [f"{p}: model {tuple(ours[p].shape)}, checkpoint {tuple(np.shape(theirs[p]))}"
                for p in ours.keys() & theirs.keys() if tuple(ours[p].shape) != tuple(np.shape(theirs[p]))]
  if missing or unexpected or mismatched:
    raise ValueError(f"state does not fit {type(module).__name__}:\n  missing: {missing}\n"
                     f"  unexpected: {unexpected}\n  shape mismatches: {mismatched}")
  nnx.replace_by_pure_dict(model_state, jax.tree.map(jnp.asarray, state))
  nnx.update(module, model_state)
