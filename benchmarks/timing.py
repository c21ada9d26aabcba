"""Timing side by side, the rows of the table, and the run's shared state (`Session`).

Every row times ours and the peer alternately (ours, peer, peer, ours, ...) and reports medians of the
wall-clock time and of this process's CPU time. The 'machine' row measures the float32 matrix-multiply
rate that every FLOP/s of the table is set against.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Callable

SUITES = ("core", "model", "train", "input", "accelerator", "deploy", "eval", "dense", "all")
CPU_SUITES = ("core", "model", "train", "input")


@dataclasses.dataclass(frozen=True)
class Options:
  """What to run (scripts/benchmark.py's flags).

  Attributes:
    quick: tiny shapes and one repeat, a smoke test (its times mean nothing).
    repeats: timed repeats per case and side, after one warm-up.
    profile: also profile our training step and inference per XLA operation, torchvision's per ATen
      operator.
    torch_threads: `torch.set_num_threads` (0: torch's default).
    data_dir: where the input suite builds its stand-in JPEG dataset (once).
    input_seconds: seconds per input-pipeline measurement.
    compile_cache_rows: train suite: also measure the first step in two new processes with the
      persistent compilation cache.
    accelerator_sizes: accelerator suite: training image sizes.
    accelerator_batches: accelerator suite: batch sizes tried in increasing order; the largest that
      fits is measured.
    peak_tflops: accelerator suite: the device's dense bfloat16 peak (0: looked up by device kind).
    script: the benchmark script, which the compile-cache rows start again as child processes.
  """

  quick: bool = False
  repeats: int = 5
  profile: bool = False
  torch_threads: int = 0
  data_dir: str = os.path.join(tempfile.gettempdir(), "retinanet_jax_benchmark")
  input_seconds: float = 10.0
  compile_cache_rows: bool = True
  accelerator_sizes: tuple[int, ...] = (640, 1024)
  accelerator_batches: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
  peak_tflops: float = 0.0
  script: str = ""

  def __post_init__(self):
    if self.repeats < 1:
      raise ValueError(f"repeats must be >= 1, got {self.repeats}")
    if list(self.accelerator_batches) != sorted(self.accelerator_batches):
      raise ValueError(f"accelerator_batches must increase, got {self.accelerator_batches}")


@dataclasses.dataclass
class Session:
  """One run: its options (`repeats` is 1 in quick mode), the best matmul rate measured so far
  (FLOP/s), the profile sections gathered, and the load average at the start."""

  options: Options
  matmul_flops_per_second: float = 0.0
  profiles: list[str] = dataclasses.field(default_factory=list)
  load_at_start: str = "?"

  def __post_init__(self):
    if self.options.quick and self.options.repeats != 1:
      self.options = dataclasses.replace(self.options, repeats=1)


@dataclasses.dataclass
class Timing:
  wall: float
  cpu: float


@dataclasses.dataclass
class Row:
  suite: str
  case: str
  ours: Timing
  peer: Timing
  flops: float = 0.0  # per call, XLA's count for our program (the same work for both)
  note: str = ""

  @property
  def ratio(self) -> float:
    return self.peer.wall / self.ours.wall

  @property
  def cpu_ratio(self) -> float:
    return self.peer.cpu / self.ours.cpu if self.ours.cpu > 0 else float("nan")


def timed(fn: Callable[[], object]) -> Timing:
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def side_by_side(ours: Callable[[], object], peer: Callable[[], object], repeats: int,
                 *, warmup: bool = True) -> tuple[Timing, Timing]:
  """Median wall and CPU times of `ours` and `peer`, run alternately (ABBA order) after a warm-up."""
  if warmup:
    ours()
    peer()
  times = {0: [], 1: []}
  for i in range(repeats):
    order = (0, 1) if i % 2 == 0 else (1, 0)
    for side in order:
      times[side].append(timed(ours if side == 0 else peer))
  med = lambda ts: Timing(statistics.median(t.wall for t in ts), statistics.median(t.cpu for t in ts))
  return med(times[0]), med(times[1])


def round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
  """Median wall and CPU times of each of `fns`, run in turn after one warm-up call each, the order
  reversed every other round (A B C, C B A, ...) so that a change of the machine's load hits all."""
  for fn in fns.values():
    fn()
  names = list(fns)
  times = {name: [] for name in names}
  for i in range(repeats):
    for name in (names if i % 2 == 0 else names[::-1]):
      times[name].append(timed(fns[name]))
  return {name: Timing(statistics.median(t.wall for t in ts), statistics.median(t.cpu for t in ts))
          for name, ts in times.items()}


def block(x):
  """`jax.block_until_ready(x)`."""
  import jax
  return jax.block_until_ready(x)


def flops_rates(row: Row) -> tuple[float, float]:
  return (row.flops / row.ours.wall, row.flops / row.peer.wall) if row.flops else (0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Machine: the float32 matrix-multiply rate every FLOP/s is compared with
# ----------------------------------------------------------------------------------------------


def _matmul_case(quick: bool):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import profiling

  n = 512 if quick else 2048
  a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
  compiled = jax.jit(jnp.dot).lower(a, a).compile()
  flops = profiling.compiled_flops(compiled) or 2.0 * n ** 3
  a_dev = jnp.asarray(a)
  return n, a, flops, lambda: block(compiled(a_dev, a_dev))


def update_matmul_rate(session: Session) -> None:
  """The machine's rate: the best of `repeats` float32 matmuls (kept if better than before)."""
  _, _, flops, ours = _matmul_case(session.options.quick)
  ours()
  best = min(timed(ours).wall for _ in range(session.options.repeats))
  session.matmul_flops_per_second = max(session.matmul_flops_per_second, flops / best)


def bench_machine(session: Session) -> list[Row]:
  quick, repeats = session.options.quick, session.options.repeats
  import torch

  n, a, flops, ours_fn = _matmul_case(quick)
  a_t = torch.from_numpy(a.copy())
  ours, peer = side_by_side(ours_fn, lambda: torch.mm(a_t, a_t), repeats)
  update_matmul_rate(session)
  return [Row("machine", f"float32 matmul {n}x{n}x{n} (jnp.dot vs torch.mm)", ours, peer, flops,
              "the % column's reference: our best matmul rate at the start or end of the run")]
