"""Which cases each suite runs, running them, and the report: the machine, the table, the sections of
docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import sys
import time

from benchmarks import accelerator, core, deploy, dense, evaluation, inference, input_pipeline, training
from benchmarks.timing import (CPU_SUITES, SUITES, Row, Session, bench_machine, flops_rates,
                               update_matmul_rate)

SUITE_CASES = {
    "core": (core.bench_focal_loss, core.bench_matching, core.bench_postprocess),
    "model": (inference.bench_model,),
    "train": (training.bench_train,),
    "input": (input_pipeline.bench_input,),
    "accelerator": (accelerator.bench_accelerator,),
    "deploy": (deploy.bench_deploy,),
    "eval": (evaluation.bench_coco_eval,),  # not in 'all': it needs faster-coco-eval
    # not in 'all' (an R50 step at 640 twice, matching at 2,000 boxes): run it on its own
    "dense": (dense.bench_dense_matching, dense.bench_dense_nms, dense.bench_dense_training),
}


def suite_cases(suite: str, *, quick: bool) -> tuple:
  """The cases of `suite`. 'all' is the four CPU suites, plus the accelerator suite in quick mode (so
  that the tests run it on the CPU); 'deploy', 'eval' and 'dense' run on their own (--suite=deploy,
  --suite=eval, --suite=dense). The CPU suites run torchvision on the CPU, so on a GPU or TPU host they would
  compare different hardware: there they need JAX_PLATFORMS=cpu, and the device rows
  come from --suite=accelerator."""
  import jax
  if suite not in SUITES:
    raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
  names = list(CPU_SUITES) + (["accelerator"] if quick else []) if suite == "all" else [suite]
  if jax.default_backend() != "cpu" and set(names) & {*CPU_SUITES, "deploy"}:
    raise ValueError(f"--suite={suite} compares against torchvision on the CPU but JAX runs on "
                     f"{jax.default_backend()}: run it with JAX_PLATFORMS=cpu, and use "
                     "--suite=accelerator for this device")
  return tuple(c for name in names for c in SUITE_CASES[name])


def run(suite: str, session: Session) -> list[Row]:
  """The rows of `suite`: the machine's matmul row first, its rate measured again at the end (the
  machine may be quieter then; the better of the two is the table's reference)."""
  cases = suite_cases(suite, quick=session.options.quick)
  if hasattr(os, "getloadavg"):
    session.load_at_start = " / ".join(f"{x:.1f}" for x in os.getloadavg())
  rows = []
  for case in (bench_machine,) + cases:
    start = time.perf_counter()
    rows.extend(case(session))
    print(f"{case.__name__}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  update_matmul_rate(session)
  return rows


def machine_description(session: Session) -> str:
  import jax
  import torch
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
      cpu = f"{names[0]} x {len(names)} threads" if names else cpu
  except OSError:
    pass
  load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
  peer_device = f"; {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
  return (f"{cpu}; load average (1/5/15 min) {session.load_at_start} at the start, {load} at the "
          f"end; jax {jax.__version__} "
          f"({jax.default_backend()}, {jax.device_count()} x {jax.devices()[0].device_kind}), "
          f"XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads{peer_device}), torchvision peer")


def format_table(rows: list[Row], *, matmul_flops_per_second: float) -> str:
  """The markdown table of docs/benchmarks.md (its "How to read the table" explains the columns)."""
  peak = matmul_flops_per_second
  lines = ["| suite | case | ours (ms) | torchvision (ms) | torchvision / ours | same, CPU time | "
           f"GFLOP/s ours / torchvision | ours % of matmul ({peak / 1e9:.0f} GFLOP/s) | note |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ours_rate, peer_rate = flops_rates(r)
    rate = f"{ours_rate / 1e9:.3g} / {peer_rate / 1e9:.3g}" if r.flops else ""
    share = f"{100 * ours_rate / peak:.0f}%" if r.flops and peak else ""
    cpu = f"{r.cpu_ratio:.2f}x" if r.ours.cpu > 0 and r.peer.cpu > 0 else ""
    lines.append(f"| {r.suite} | {r.case} | {r.ours.wall * 1e3:.1f} | {r.peer.wall * 1e3:.1f} | "
                 f"{r.ratio:.2f}x | {cpu} | {rate} | {share} | {r.note} |")
  return "\n".join(lines)


def write_section(path: str, name: str, body: str) -> None:
  """Replaces the text between `<!-- name:begin -->` and `<!-- name:end -->` (appended if absent)."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  if begin not in text:
    text = text.rstrip("\n") + "\n\n" + begin + "\n" + end + "\n"
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(head + begin + "\n" + body.strip("\n") + "\n" + end + tail)
