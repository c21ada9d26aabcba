"""scripts/benchmark.py and benchmarks/: every suite runs (--quick) and fills every row;
the options, the largest-batch search, the report sections; the XLA-flag helpers and the per-operation
profile on a small program."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profiling
from retinanet_jax.runtime import xla_flags

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXPECTED_ROWS = (
    ("machine", "float32 matmul"),
    ("core", "focal loss"), ("core", "matching"), ("core", "post-processing"),
    ("model", "inference 96x96: first call"), ("model", "inference 96x96 (padded"),
    ("model", "inference 96x150: first call"), ("model", "inference 96x150 (padded"),
    ("train", "first step (ours"), ("train", "normalize + network + matching"),
    ("train", "empty persistent cache"), ("train", "persistent cache filled"),
    ("input", "input pipeline LSJ"), ("input", "input pipeline resize"),
    ("accelerator", "training step bfloat16 96x96 at the largest batch"),
    ("accelerator", "batch 1 (latency)"), ("accelerator", "batch 4 (throughput)"),
)
DEPLOY_FORMS = ("in-process jit", "StableHLO (jax.export)", "SavedModel (TensorFlow)",
                "ONNX (onnxruntime)")


def _number(cell: str) -> float:
  return float(cell.strip().rstrip("x%"))


def _quick_rows(*flags) -> dict:
  """The table printed by `benchmark.py --quick *flags`, as {(suite, case): cells}."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--quick", *flags],
      capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-5000:]
  rows = {}
  for line in out.stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 9 and cells[0] in {suite for suite, _ in EXPECTED_ROWS} | {"deploy"}:
      rows[(cells[0], cells[1])] = cells
  return rows


@pytest.fixture(scope="module")
def quick_table(tmp_path_factory):
  """The table printed by `benchmark.py --suite=all --quick`, as {(suite, case): cells}."""
  return _quick_rows("--suite=all", f"--data_dir={tmp_path_factory.mktemp('data')}")


def test_quick_run_has_every_row_with_positive_times(quick_table):
  for suite, prefix in EXPECTED_ROWS:
    found = [cells for (s, case), cells in quick_table.items() if s == suite and prefix in case]
    assert found, f"no {suite} row containing {prefix!r} in {sorted(quick_table)}"
    for cells in found:
      ours, peer, ratio = _number(cells[2]), _number(cells[3]), _number(cells[4])
      assert ours > 0 and peer > 0 and ratio > 0, cells
      if cells[5]:
        assert _number(cells[5]) > 0, cells


def test_compiled_rows_report_flop_rates(quick_table):
  for (suite, case), cells in quick_table.items():
    if suite in ("machine", "model", "train") and ("batch 1:" in case or "matmul" in case
                                                   or "normalize + network + matching" in case):
      ours_rate, peer_rate = (float(x) for x in cells[6].split("/"))
      assert ours_rate > 0 and peer_rate > 0 and _number(cells[7]) > 0, cells


def test_accelerator_rows_report_model_flop_utilization(quick_table):
  train = [c for (s, case), c in quick_table.items() if s == "accelerator" and "training" in case]
  assert len(train) == 1
  ours, peer = (float(x) for x in re.search(r"utilization ([\d.]+)% vs ([\d.]+)%", train[0][8]).groups())
  assert ours > 0 and peer > 0
  # Time per image: the ratio is the images/s ratio, whatever batch each side fits.
  rate_ours, rate_peer = (float(x) for x in re.search(r"([\d.]+) vs ([\d.]+) images/s", train[0][8]).groups())
  # The text rounds each rate to 0.1 images/s: allow that rounding (it is large at the low rates of
  # a loaded machine) on top of the table's own rounding.
  rounding = 0.05 / rate_ours + 0.05 / rate_peer
  np.testing.assert_allclose(_number(train[0][4]), rate_ours / rate_peer, rtol=0.05 + rounding)


def test_persistent_cache_is_hit_by_the_second_process(quick_table):
  cold = [c for (s, case), c in quick_table.items() if "empty persistent cache" in case][0]
  warm = [c for (s, case), c in quick_table.items() if "persistent cache filled" in case][0]
  compile_s = lambda cells: float(re.search(r"compile ([\d.]+) s", cells[8]).group(1))
  assert compile_s(warm) < compile_s(cold)
  assert "cache 0 entries" not in cold[8]


def test_merge_flags_keeps_the_users_value_and_drops_deprecated_flags():
  merged = xla_flags.merge_flags("--xla_cpu_enable_fast_math=true --xla_foo=1",
                                 ["--xla_cpu_enable_fast_math=false", "--xla_bar=2",
                                  "--xla_cpu_use_thunk_runtime=false"])
  assert merged == "--xla_cpu_enable_fast_math=true --xla_foo=1 --xla_bar=2"
  assert xla_flags.merge_flags("", "--a=1 --b") == "--a=1 --b"
  assert xla_flags.merge_flags("--a=1", []) == "--a=1"


def test_apply_xla_flags_on_a_given_environment():
  env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  value = xla_flags.apply_xla_flags(xla_flags.CPU_FLAGS, environ=env)
  assert env["XLA_FLAGS"] == value
  assert value.startswith("--xla_dump_to=/tmp/x")
  for flag in xla_flags.CPU_FLAGS:
    assert flag in value


def test_cpu_flags_are_accepted_by_xla():
  # An unknown flag aborts the process when the backend starts; a known one runs.
  code = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
  env = dict(os.environ, XLA_FLAGS=" ".join(xla_flags.CPU_FLAGS), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
  assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]
  assert "no longer supported" not in out.stderr


def test_op_profile_classifies_a_convolution_step():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 8)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 8, 16)), jnp.float32)

  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y) ** 2)

  compiled = jax.jit(jax.value_and_grad(loss)).lower(w, x).compile()
  profile = profiling.op_profile(lambda: jax.block_until_ready(compiled(w, x)), compiled, repeats=1)
  info = profiling.classify_instructions(compiled.as_text())
  conv_flops = {cat: sum(f for c, f in info.values() if c == cat)
                for cat in ("convolution forward", "convolution input-gradient",
                            "convolution weight-gradient")}
  forward = 2 * 2 * 16 * 16 * 16 * 9 * 8
  assert conv_flops["convolution forward"] == forward
  assert conv_flops["convolution weight-gradient"] == forward
  assert profile.per_op and profile.total_seconds > 0
  table = profiling.format_profile(profile, matmul_flops_per_second=1e10)
  assert "convolution forward" in table
  assert profiling.compiled_flops(compiled) > 0


def test_largest_fitting_batch_stops_at_the_first_out_of_memory():
  from benchmarks import accelerator as bench  # pylint: disable=import-outside-toplevel
  tried = []

  def measure(batch):
    tried.append(batch)
    if batch >= 32:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.2GiB")
    return batch * 10

  assert bench.largest_fitting(measure, (8, 16, 32, 64)) == (16, 160)
  assert tried == [8, 16, 32]
  assert bench.is_out_of_memory(type("OutOfMemoryError", (Exception,), {})("CUDA out of memory"))
  with pytest.raises(RuntimeError, match="no batch size"):
    bench.largest_fitting(measure, (32, 64))
  with pytest.raises(ValueError, match="bad shape"):
    bench.largest_fitting(lambda b: (_ for _ in ()).throw(ValueError("bad shape")), (8,))


def test_options_are_checked_and_quick_runs_once():
  from benchmarks import timing  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="repeats must be >= 1"):
    timing.Options(repeats=0)
  with pytest.raises(ValueError, match="accelerator_batches must increase"):
    timing.Options(accelerator_batches=(32, 16))
  assert timing.Session(timing.Options(quick=True, repeats=5)).options.repeats == 1
  assert timing.Session(timing.Options(repeats=5)).options.repeats == 5


def test_side_by_side_alternates_and_takes_medians():
  from benchmarks import timing  # pylint: disable=import-outside-toplevel
  calls = []
  ours, peer = timing.side_by_side(lambda: calls.append("o"), lambda: calls.append("p"), 4)
  assert calls == ["o", "p"] + ["o", "p", "p", "o", "o", "p", "p", "o"]  # warm-up, then ABBA
  assert ours.wall >= 0 and peer.wall >= 0
  row = timing.Row("core", "x", timing.Timing(2.0, 1.0), timing.Timing(3.0, 4.0), flops=6.0)
  assert row.ratio == 1.5 and row.cpu_ratio == 4.0
  assert timing.flops_rates(row) == (3.0, 2.0)


def test_write_section_replaces_only_its_own_section(tmp_path):
  from benchmarks import report  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "benchmarks.md")
  with open(path, "w") as f:
    f.write("# Benchmarks\n\nintro\n<!-- benchmark:begin -->\nold\n<!-- benchmark:end -->\ntail\n")
  report.write_section(path, "benchmark", "new table")
  report.write_section(path, "benchmark-accelerator", "gpu rows")
  text = open(path).read()
  assert text.startswith("# Benchmarks\n\nintro\n<!-- benchmark:begin -->\nnew table\n<!-- benchmark:end -->\ntail\n")
  assert text.endswith("<!-- benchmark-accelerator:begin -->\ngpu rows\n<!-- benchmark-accelerator:end -->\n")
  assert "old" not in text


def test_deploy_suite_times_forms_that_compute_the_same_detections():
  """`--suite=deploy --quick`: a row per form with positive times; each exported form's note gives its
  time against the in-process model's and its sorted scores within 1e-5 of the in-process model's
  (the same detections; tests/test_export.py checks them fully)."""
  table = _quick_rows("--suite=deploy")
  rows = {form: [c for (s, case), c in table.items() if s == "deploy" and case.startswith(form)]
          for form in DEPLOY_FORMS}
  assert all(len(found) == 1 for found in rows.values()), sorted(table)
  for form, (cells,) in rows.items():
    assert _number(cells[2]) > 0 and _number(cells[3]) > 0 and _number(cells[4]) > 0, cells
    if form == DEPLOY_FORMS[0]:
      continue
    ratio, difference = re.search(r"([\d.]+)x the in-process time; sorted scores within (\S+) of it",
                                  cells[8]).groups()
    assert float(ratio) > 0 and float(difference) < 1e-5, cells


def test_eval_suite_times_both_backends_on_the_same_numbers():
  from benchmarks import evaluation as evaluation_bench
  from benchmarks import timing
  rows = evaluation_bench.bench_coco_eval(timing.Session(timing.Options(quick=True)))
  assert len(rows) == 2
  for row in rows:
    assert row.suite == "eval" and row.ours.wall > 0 and row.peer.wall > 0
    assert float(row.note.rsplit(" ", 1)[-1]) < 1e-6  # largest metric difference


def test_dense_suite_fills_its_rows():
  from benchmarks import dense
  from benchmarks import timing
  session = timing.Session(timing.Options(quick=True))
  rows = dense.bench_dense_matching(session) + dense.bench_dense_nms(session)
  rows += dense.bench_dense_training(session)
  cases = [row.case for row in rows]
  assert len(rows) == 6, cases
  for row in rows:
    assert row.suite == "dense" and row.ours.wall > 0 and row.peer.wall > 0, row
  assert "peak RSS growth ours" in rows[0].note and "kept; rounds NMS" in rows[2].note
  assert "ours 100 / 10 boxes" in rows[-1].note
