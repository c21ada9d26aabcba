"""Run by tests/test_collectives.py, as 1 process or as one of 2 (jax.distributed, gloo): sums fixed
per-device arrays over all devices with `collectives.ordered_sum` and with `lax.psum`, and prints
both results' bits as hex digests (one JSON line, process 0 only).

    python tests/helpers/collectives_probe.py [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import hashlib
import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from retinanet_jax.runtime import collectives


def main(argv):
  if len(argv) == 4:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=argv[1], num_processes=int(argv[2]),
                               process_id=int(argv[3]))
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",))
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((n, 10_001)) * 10.0 ** rng.integers(-4, 4, (n, 10_001))).astype(np.float32)
  placed = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data")), lambda i: x[i])
  out = {}
  for name, fn in (("ordered", lambda a: collectives.ordered_sum(a, "data")),
                   ("psum", lambda a: jax.lax.psum(a, "data"))):
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False))
    total = np.asarray(f(placed).addressable_shards[0].data)[0]
    out[name] = hashlib.sha256(total.tobytes()).hexdigest()
  left_to_right = x[0]
  for i in range(1, n):
    left_to_right = left_to_right + x[i]
  out["numpy_left_to_right"] = hashlib.sha256(left_to_right.tobytes()).hexdigest()
  if jax.process_index() == 0:
    print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv)
