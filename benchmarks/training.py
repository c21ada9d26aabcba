"""The train suite: one training step (normalization, network, matching, loss, backward, SGD) of
R50-FPN at 512x512, batch 2, against torchvision's (train mode: forward, backward, SGD step); the time
to the first step; and, in new processes, the first step at 640x640 with JAX's persistent compilation
cache empty, then filled by the first process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import networks
from benchmarks.networks import FULL_NET, TINY_NET
from benchmarks.timing import Row, Session, Timing, block, side_by_side, timed
from retinanet_jax.runtime import xla_flags


def bench_train(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  from benchmarks import profiling

  spec = TINY_NET if quick else FULL_NET
  size, batch = (96, 2) if quick else (512, 2)
  torch_model = networks.torchvision_retinanet(spec)
  compiled, state, device_batch, host_batch, timings = networks.our_training(
      spec, size, batch, state_dict=networks.converted_state(torch_model, spec))
  holder = [state]

  def ours():
    holder[0], metrics = compiled(holder[0], device_batch)
    return block(metrics["loss"])

  first = Timing(timings["trace"] + timings["compile"] + timed(ours).wall, 0.0)
  peer = networks.torchvision_training(torch_model, host_batch)
  peer_first = timed(peer)
  rows = [Row("train", f"training step {size}x{size} batch {batch}: first step (ours: trace + "
              "compile + run)", first, peer_first, 0.0,
              f"ours: trace {timings['trace']:.1f} s, compile {timings['compile']:.1f} s")]
  ours_t, peer_t = side_by_side(ours, peer, repeats, warmup=False)
  rows.append(Row("train", f"training step {size}x{size} batch {batch}: normalize + network + "
                  "matching + loss + backward + SGD", ours_t, peer_t,
                  profiling.compiled_flops(compiled),
                  f"{batch / ours_t.wall:.2f} vs {batch / peer_t.wall:.2f} images/s"))
  if session.options.profile:
    networks.profile_section(session, f"Training step {size}x{size}, batch {batch}", ours, compiled, peer)
  if session.options.compile_cache_rows:
    rows.extend(bench_compile_cache(session))
  return rows


def compile_cache_child(cache_dir: str, quick: bool) -> dict:
  """In a fresh process: our first training step at 640x640 with the persistent cache in
  `cache_dir`, and torchvision's first step at the same size."""
  import jax

  xla_flags.enable_compilation_cache(cache_dir)
  spec = TINY_NET if quick else FULL_NET
  size = 96 if quick else 640
  torch_model = networks.torchvision_retinanet(spec)
  compiled, state, device_batch, host_batch, timings = networks.our_training(
      spec, size, 2, state_dict=networks.converted_state(torch_model, spec))
  start = time.perf_counter()
  _, metrics = compiled(state, device_batch)
  jax.block_until_ready(metrics["loss"])
  ours = timings["trace"] + timings["compile"] + time.perf_counter() - start
  peer = timed(networks.torchvision_training(torch_model, host_batch)).wall
  entries = [os.path.join(cache_dir, f) for f in os.listdir(cache_dir)]
  return {"size": size, "ours": ours, "peer": peer, **timings, "entries": len(entries),
          "bytes": sum(os.path.getsize(f) for f in entries if os.path.isfile(f))}


def bench_compile_cache(session: Session) -> list[Row]:
  """The first step in two new processes (`options.script --compile_cache_child=DIR`, which runs
  `compile_cache_child`): the persistent cache empty, then filled by the first."""
  options = session.options
  if not options.script:
    raise ValueError("the compile-cache rows need options.script, the benchmark script to start again")
  rows = []
  with tempfile.TemporaryDirectory() as cache_dir:
    for label in ("empty persistent cache", "second process, persistent cache filled by the first"):
      command = [sys.executable, options.script, f"--compile_cache_child={cache_dir}",
                 f"--quick={options.quick}", f"--torch_threads={options.torch_threads}"]
      done = subprocess.run(command, capture_output=True, text=True, check=False,
                            cwd=os.path.dirname(os.path.abspath(options.script)))
      lines = [l for l in done.stdout.splitlines() if l.startswith("COMPILE_CACHE_RESULT ")]
      if done.returncode or not lines:
        raise RuntimeError(f"compile-cache child failed ({done.returncode}):\n{done.stderr[-3000:]}")
      r = json.loads(lines[-1].split(" ", 1)[1])
      rows.append(Row("train", f"training step {r['size']}x{r['size']} batch 2, new process, {label}: "
                      "first step (ours: trace + compile + run)", Timing(r["ours"], 0.0),
                      Timing(r["peer"], 0.0), 0.0,
                      f"ours: trace {r['trace']:.1f} s, compile {r['compile']:.1f} s; cache "
                      f"{r['entries']} entries, {r['bytes'] / 1e6:.0f} MB"))
  return rows
