"""Where a compiled XLA program spends its time: a per-operation profile grouped by kind, with FLOPs.

`op_profile(run, compiled)` runs `run()` (which must execute `compiled` and block) under
`jax.profiler.trace`, reads back the per-thunk events of XLA's CPU runtime, and groups them by the
category of their HLO instruction (`classify_instructions` reads the optimized HLO of `compiled`):
convolutions split into forward, input-gradient and weight-gradient; dots (GEMMs); layout copies and
transposes; elementwise fusions; pooling; loops; collectives. Convolution and dot FLOPs come from their
shapes, so each category gets an achieved GFLOP/s to set against the machine's matrix-multiply rate.

Times are per execution (the mean over `repeats`): the duration of the thunk's own trace event, except
for asynchronous thunks (XLA's Eigen convolutions and dots, which return at once and finish later),
whose time runs to their "end:" event. XLA runs independent thunks concurrently on its thread pool, so
asynchronous times overlap other work and the categories can add up to more than the wall-clock time.
On GPU/TPU the device events have other names: this module is for CPU.

`compiled_flops(compiled)` is XLA's own count (`cost_analysis()['flops']`) of a compiled program.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import math
import re
import tempfile
from typing import Callable

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_DIMS = re.compile(r"[a-z]\w*\[([\d,]*)\]")

CATEGORIES = (
    "convolution forward", "convolution input-gradient", "convolution weight-gradient",
    "dot forward", "dot backward", "layout copies and transposes", "elementwise fusions",
    "reductions", "max-pool and its gradient", "sort, gather, scatter", "while loops",
    "collectives", "other")


def compiled_flops(compiled) -> float:
  """XLA's FLOP count of one execution of a `jax.stages.Compiled`."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def _dims(shape: str) -> list[int]:
  m = _DIMS.search(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _parse_computations(hlo_text: str) -> dict[str, list[tuple[str, str, str, str]]]:
  """computation name -> [(instruction name, shape, opcode, full line)]."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    if not line.startswith((" ", "}")) and line.rstrip().endswith("{"):
      m = _COMPUTATION.match(line)
      current = computations.setdefault(m.group(1), []) if m else None
    elif line.startswith("}"):
      current = None
    elif current is not None:
      m = _INSTRUCTION.match(line)
      if m:
        current.append((m.group(1), m.group(2), m.group(3), line))
  return computations


def _operand_dims(line: str, opcode: str, shapes: dict[str, str]) -> list[list[int]]:
  args = line.split(f" {opcode}(", 1)[1].split(")", 1)[0]
  return [_dims(shapes.get(name, "")) for name in re.findall(r"%([\w.\-]+)", args)]


def _conv_kind_and_flops(shape: str, line: str, shapes: dict[str, str], backward: bool):
  out = _dims(shape)
  operands = _operand_dims(line, "convolution", shapes)
  lhs = operands[0] if operands else []
  window = re.search(r"size=([\dx]+)", line)
  window = [int(v) for v in window.group(1).split("x")] if window else [1]
  labels = re.search(r"dim_labels=(\w+)_\w+->(\w+)", line)
  feature_dim = labels.group(1).index("f") if labels and lhs else len(lhs) - 1
  groups = re.search(r"feature_group_count=(\d+)", line)
  in_features = lhs[feature_dim] // (int(groups.group(1)) if groups else 1) if lhs else 1
  flops = 2 * math.prod(out) * math.prod(window) * in_features
  # The weight gradient's output is the kernel (its spatial dims are the kernel size) and its window
  # is the feature map; the input gradient's output is a feature map and its window the (reversed)
  # kernel. XLA's layout passes can drop the metadata, so shapes decide first.
  out_labels = labels.group(2) if labels else ""
  spatial = [out[i] for i, c in enumerate(out_labels) if c.isdigit() and i < len(out)]
  if spatial and math.prod(spatial) < math.prod(window) and (backward or max(window) > 7):
    return "convolution weight-gradient", flops
  if backward or "rhs_reversal" in line or "lhs_dilate" in line:
    return "convolution input-gradient", flops
  return "convolution forward", flops


def _dot_flops(shape: str, line: str, shapes: dict[str, str]) -> int:
  operands = _operand_dims(line, "dot", shapes)
  lhs = operands[0] if operands else []
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
  k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting and lhs else 1
  return 2 * math.prod(_dims(shape)) * k


def classify_instructions(hlo_text: str) -> dict[str, tuple[str, float]]:
  """Instruction name -> (category, FLOPs) for every instruction of an optimized HLO module that runs
  as a thunk (instructions inside fusions are counted in their fusion)."""
  computations = _parse_computations(hlo_text)
  fused = {m.group(1) for instructions in computations.values() for *_, line in instructions
           for m in [re.search(r"calls=%?([\w.\-]+)", line)] if m}
  result = {}
  for computation, instructions in computations.items():
    if computation in fused:  # the bodies of fusions: their fusion instruction stands for them
      continue
    outer_shapes = {n: s for n, s, _, _ in instructions}
    for name, shape, opcode, line in instructions:
      called = re.search(r"calls=%?([\w.\-]+)", line)
      body = computations.get(called.group(1), []) if called else []
      shapes = {n: s for n, s, _, _ in body} if body else outer_shapes
      body = body or [(name, shape, opcode, line)]
      opcodes = {o for _, _, o, _ in body}
      backward = "transpose(jvp" in line or any("transpose(jvp" in l for *_, l in body)
      category, flops = None, 0
      for _, s, o, l in body:
        if o == "convolution":
          kind, f = _conv_kind_and_flops(s, l, shapes, backward)
          category, flops = category or kind, flops + f
        elif o == "dot":
          category = category or ("dot backward" if backward else "dot forward")
          flops += _dot_flops(s, l, shapes)
      if category is None:
        roots = [o for _, _, o, l in body if l.lstrip().startswith("ROOT")]
        root = roots[0] if roots else opcode
        if opcode == "while":
          category = "while loops"
        elif opcodes & {"all-reduce", "all-gather", "reduce-scatter", "all-to-all"}:
          category = "collectives"
        elif opcodes & {"reduce-window", "select-and-scatter"}:
          category = "max-pool and its gradient"
        elif opcodes & {"sort", "gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
          category = "sort, gather, scatter"
        elif root in ("transpose", "copy") or opcodes <= {"parameter", "transpose", "copy", "bitcast",
                                                           "reshape"} or "transpose" in opcodes:
          category = "layout copies and transposes"
        elif "reduce" in opcodes:
          category = "reductions"
        elif opcode in ("fusion", "add", "multiply", "select", "maximum", "convert", "broadcast",
                        "slice", "concatenate", "pad", "compare", "divide", "exponential",
                        "subtract", "negate", "and", "or"):
          category = "elementwise fusions"
        else:
          category = "other"
      result[name] = (category, float(flops))
  return result


@dataclasses.dataclass
class OpProfile:
  """Per-category totals of one execution. `per_op[name] = seconds`; `info[name] = (category, flops)`."""

  categories: dict[str, tuple[float, float, int]]  # category -> (seconds, flops, number of ops)
  per_op: dict[str, float]
  info: dict[str, tuple[str, float]]
  wall_seconds: float

  @property
  def total_seconds(self) -> float:
    return sum(s for s, _, _ in self.categories.values())


def _thunk_times(xspace_path: str, repeats: int) -> dict[str, tuple[float, float]]:
  """Thunk name -> (seconds inside its own event, seconds from its start to its "end:" event)."""
  import jax  # pylint: disable=import-outside-toplevel

  data = jax.profiler.ProfileData.from_file(xspace_path)
  starts, ends = collections.defaultdict(list), collections.defaultdict(list)
  for plane in data.planes:
    for line in plane.lines:
      if "XLA" not in line.name:  # the runtime's thread pools: tf_XLAEigen, tf_XLAPjRtCpuClient
        continue
      for event in line.events:
        name = event.name
        if name.startswith("end: "):
          ends[name[5:]].append(event.start_ns)
        elif "::" not in name and not name.startswith("$"):
          starts[name].append((event.start_ns, event.duration_ns))
  times = {}
  for name, spans in starts.items():
    done = sorted(ends.get(name, []))
    inside = elapsed = 0.0
    for start, duration in sorted(spans):
      later = [e for e in done if e >= start]
      inside += duration
      elapsed += max(duration, (later[0] - start) if later else duration)
    times[name] = (inside * 1e-9 / repeats, elapsed * 1e-9 / repeats)
  return times


def _is_async(category: str, inside: float, elapsed: float) -> bool:
  """Eigen convolutions and dots return from their thunk at once and complete later (their "end:"
  event); library calls (YNNPACK, oneDNN) and loop fusions finish inside their event, and their
  "end:" event can come much later, when the executor gets to it."""
  return category.startswith(("convolution", "dot")) and inside < 0.05 * elapsed


def op_profile(run: Callable[[], object], compiled, *, repeats: int = 2) -> OpProfile:
  """Profiles `repeats` calls of `run` (which executes `compiled` and blocks until it is done)."""
  import time  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  run()  # warm
  with tempfile.TemporaryDirectory() as directory:
    start = time.perf_counter()
    with jax.profiler.trace(directory):
      for _ in range(repeats):
        run()
    wall = (time.perf_counter() - start) / repeats
    paths = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb file under {directory}")
    times = _thunk_times(paths[0], repeats)
  info = classify_instructions(compiled.as_text())
  categories = collections.defaultdict(lambda: [0.0, 0.0, 0])
  per_op = {}
  for name, (inside, elapsed) in times.items():
    category, flops = info.get(name, ("other", 0.0))
    seconds = per_op[name] = elapsed if _is_async(category, inside, elapsed) else inside
    entry = categories[category]
    entry[0] += seconds
    entry[1] += flops
    entry[2] += 1
  return OpProfile({k: tuple(v) for k, v in categories.items()}, per_op, info, wall)


def format_profile(profile: OpProfile, *, matmul_flops_per_second: float | None = None,
                   top: int = 8) -> str:
  """A markdown table of the categories (largest first) and the `top` slowest operations."""
  total = profile.total_seconds or 1.0
  rate_header = " | % of matmul rate" if matmul_flops_per_second else ""
  lines = [f"| category | ms | share | GFLOP | GFLOP/s{rate_header} | ops |",
           "|---|---|---|---|---|---|" + ("---|" if matmul_flops_per_second else "")]
  for category, (seconds, flops, count) in sorted(profile.categories.items(), key=lambda kv: -kv[1][0]):
    rate = flops / seconds if seconds and flops else 0.0
    cells = [category, f"{seconds * 1e3:.0f}", f"{100 * seconds / total:.1f}%",
             f"{flops / 1e9:.1f}" if flops else "", f"{rate / 1e9:.0f}" if rate else ""]
    if matmul_flops_per_second:
      cells.append(f"{100 * rate / matmul_flops_per_second:.0f}%" if rate else "")
    cells.append(str(count))
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"Slowest operations (of {len(profile.per_op)}; wall-clock per execution while "
               f"profiling: {profile.wall_seconds * 1e3:.0f} ms):")
  lines.append("")
  lines.append("| operation | category | ms | GFLOP/s |")
  lines.append("|---|---|---|---|")
  for name, seconds in sorted(profile.per_op.items(), key=lambda kv: -kv[1])[:top]:
    category, flops = profile.info.get(name, ("other", 0.0))
    rate = f"{flops / seconds / 1e9:.0f}" if flops and seconds else ""
    lines.append(f"| `{name}` | {category} | {seconds * 1e3:.0f} | {rate} |")
  return "\n".join(lines)
