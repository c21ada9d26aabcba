"""collectives.mean / ordered_sum over the 4 host CPU devices, under jit(shard_map), against NumPy."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from retinanet_jax.runtime import collectives
from tests.helpers import runs


def _per_device_trees(rng, n):
  """n different pytrees of one structure; leaf sizes not divisible by n, magnitudes 1e-4..1e3
  (so that the order of a float32 sum changes its bits)."""
  shapes = {"w": (3, 5, 7), "b": (13,), "nested": {"k": (2, 3)}}
  def leaf(shape):
    return (rng.standard_normal((n,) + shape)
            * 10.0 ** rng.integers(-4, 4, (n,) + shape)).astype(np.float32)
  return jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))


def _run(fn, stacked, n):
  mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  placed = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), stacked)
  per_device = lambda t: jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], t)))
  f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                            check_vma=False))
  return jax.tree.map(np.asarray, f(placed))  # [n, ...]: every device's result


def test_ordered_sum_adds_in_device_order_on_every_device():
  n = 4
  stacked = _per_device_trees(np.random.default_rng(0), n)
  out = _run(lambda t: collectives.ordered_sum(t, "data"), stacked, n)
  differs = 0
  for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(stacked)):
    left_to_right = ((x[0] + x[1]) + x[2]) + x[3]  # NumPy float32, the same order
    for d in range(n):
      np.testing.assert_array_equal(got[d], left_to_right)
    np.testing.assert_allclose(got[0], x.astype(np.float64).sum(0), rtol=1e-6,
                               atol=1e-6 * np.abs(x).max())
    differs += int((left_to_right != ((x[3] + x[2]) + x[1]) + x[0]).sum())
  assert differs > 0  # the inputs are such that the order shows in the bits


@pytest.mark.parametrize("mode", collectives.MODES)
def test_mean_matches_numpy_float64(mode):
  n = 4
  stacked = _per_device_trees(np.random.default_rng(1), n)
  out = _run(lambda t: collectives.mean(t, "data", mode=mode), stacked, n)
  for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(stacked)):
    np.testing.assert_allclose(got[0], x.astype(np.float64).mean(0), rtol=1e-6,
                               atol=1e-6 * np.abs(x).max())
    np.testing.assert_array_equal(got[0], got[n - 1])


def test_ordered_mean_keeps_dtypes_and_one_device_is_identity():
  stacked = {"a": np.arange(6, dtype=np.float32).reshape(1, 6) / 7,
             "h": (np.arange(4, dtype=np.float32).reshape(1, 4) / 3).astype(jnp.bfloat16)}
  out = _run(lambda t: collectives.mean(t, "data", mode="ordered"), stacked, 1)
  assert out["h"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["a"], stacked["a"])
  np.testing.assert_array_equal(out["h"], stacked["h"])


@pytest.mark.parametrize("mode", collectives.MODES)
def test_one_device_mean_runs_no_collective(mode):
  """On a 1-device axis the mean is the tree itself, with no all-reduce in the program (XLA:CPU would
  copy the whole gradient tree through one)."""
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  tree = {"w": jnp.arange(12.0).reshape(3, 4) / 7, "b": jnp.ones(5, jnp.bfloat16)}
  f = jax.jit(jax.shard_map(lambda t: collectives.mean(t, "data", mode=mode), mesh=mesh,
                            in_specs=P(), out_specs=P(), check_vma=False))
  out = f(tree)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  text = f.lower(tree).compile().as_text()
  assert "all-reduce" not in text and "all-to-all" not in text and "all-gather" not in text


def test_unknown_mode_is_an_error():
  with pytest.raises(ValueError, match="mode='tree'"):
    collectives.mean({"a": jnp.zeros(2)}, "data", mode="tree")


def _probe(processes: int) -> dict:
  """tests/helpers/collectives_probe.py on 4 CPU devices: 1 process x 4, or 2 x 2 over gloo."""
  probe = os.path.join(os.path.dirname(__file__), "helpers", "collectives_probe.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // processes}")
  port = runs.free_port()
  procs = [subprocess.Popen(
      [sys.executable, probe] + ([f"127.0.0.1:{port}", str(processes), str(i)] if processes > 1 else []),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(processes)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return json.loads(outs[0][0].strip().splitlines()[-1])


def test_ordered_sum_has_the_same_bits_on_one_process_and_on_two():
  """The point of mode="ordered": 2 processes x 2 devices (gloo) and 1 process x 4 (in-process
  collectives) give the same bits, those of NumPy adding devices 0..3 in turn; lax.psum does not."""
  one, two = _probe(1), _probe(2)
  assert one["ordered"] == two["ordered"] == one["numpy_left_to_right"]
  assert one["psum"] != two["psum"]  # gloo's ring order: the inputs make the order show
