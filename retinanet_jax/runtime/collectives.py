"""Averaging a pytree over a named mesh axis: the platform's all-reduce, or in device order.

`lax.pmean` leaves the order of its float sum to the collective's implementation: XLA's in-process
CPU collectives add devices 0+1+2+3 in turn, gloo adds around a ring, NCCL picks a ring or a tree by
topology. The same run on another layout of the same devices (1 host x 4 devices, 2 hosts x 2) then
rounds differently, ~1e-7 relative per step, and training can amplify that (with the GIoU box loss
and AdamW, 5e-4 in the loss after 20 steps of the tests' tiny config; docs/multihost.md).

`mode="ordered"` sums in device order whatever the layout, with the traffic of a ring all-reduce:
the pytree is flattened into one vector, cut into one chunk per device, each device receives chunk i
of every device (`lax.all_to_all`, exact data movement) and adds the n copies in device order, then
every device receives every sum (`lax.all_gather`). Extra memory: one flat copy of the tree. It fixes
the reduction, not the kernels: XLA:CPU's convolutions and dots can round differently with another
number of devices per process, so a whole training step is bitwise reproducible across layouts only
where the kernels are (not on the CPU between 2 and 4 devices per process).

Both must run inside a named-axis context (`shard_map` over `axis_name`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

MODES = ("psum", "ordered")


def ordered_sum(tree, axis_name: str):
  """The sum over `axis_name` of every leaf of `tree`, added in device order (0, 1, ..., n-1).

  Args:
    tree: a pytree of float arrays, the same structure and shapes on every device.
    axis_name: the mesh axis to sum over.

  Returns:
    The same pytree, every leaf the sum over devices; bitwise the same on every device and for any
    split of the axis' devices over processes.
  """
  n = jax.lax.axis_size(axis_name)
  if n == 1:
    return tree
  flat, unravel = ravel_pytree(tree)
  size = flat.shape[0]
  chunks = jnp.pad(flat, (0, (-size) % n)).reshape(n, -1)
  # Row i of `received` is this device's chunk as device i holds it.
  received = jax.lax.all_to_all(chunks, axis_name, split_axis=0, concat_axis=0, tiled=False)
  # A scan adds the rows left to right, 0 + 1 + ... + n-1: never a reduction tree XLA would choose.
  total, _ = jax.lax.scan(lambda acc, row: (acc + row, None), received[0], received[1:])
  return unravel(jax.lax.all_gather(total, axis_name, tiled=True)[:size])


def mean(tree, axis_name: str, *, mode: str = "psum"):
  """The mean over `axis_name` of every leaf of `tree`.

  Args:
    tree: a pytree of float arrays.
    axis_name: the mesh axis to average over.
    mode: "psum" (`lax.pmean`: the platform's all-reduce, fastest) or "ordered" (`ordered_sum`
      divided by the axis size: the same bits for any process layout).

  On an axis of one device, `tree` itself (both modes are the identity there).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  n = jax.lax.axis_size(axis_name)
  if n == 1:  # XLA:CPU would still run an all-reduce thunk, a copy of the whole tree
    return tree
  if mode == "psum":
    return jax.lax.pmean(tree, axis_name)
  return jax.tree.map(lambda x: x / jnp.asarray(n, x.dtype), ordered_sum(tree, axis_name))
