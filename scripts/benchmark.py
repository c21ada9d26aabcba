"""Benchmarks of retinanet_jax against torchvision, measured side by side in one run.

    python scripts/benchmark.py --suite=all --write --profile  # every suite; table into docs/benchmarks.md
    python scripts/benchmark.py --suite=train                  # one suite: core, model, train, input
    python scripts/benchmark.py --suite=accelerator --write    # on a GPU/TPU host: bfloat16 rows
    python scripts/benchmark.py --suite=deploy --write         # exported forms (needs onnx, jax2onnx)
    python scripts/benchmark.py --suite=all --quick            # smoke test: tiny shapes, 1 repeat, -O0
    python scripts/benchmark.py --suite=train --xla_flags=     # XLA's own defaults instead of ours

Suites (the peer is torchvision on the same machine, in the same process, on the same inputs); each is
a module of `benchmarks/`, whose docstring says what it measures:
  core         focal loss, anchor matching, post-processing (core.py).
  model        inference at 512x512 and 800x1333, batch 1, and the time to the first result (inference.py).
  train        one training step, the time to the first step, and the persistent compilation cache
               in new processes (training.py).
  input        the training input pipeline against torchvision's transforms, per core (input_pipeline.py).
  accelerator  bfloat16 training and inference on a GPU/TPU, torchvision with AMP (accelerator.py);
               'all' includes it in --quick only.
  deploy       latency of the exported StableHLO, SavedModel and ONNX forms and the in-process model,
               batch 1 at 512x512 and 800x1333, one round-robin (deploy.py); not part of 'all'.
  dense        thousands of boxes: matching at 100/500/2,000 boxes (time, peak memory), NMS at
               D = 100/300/1,000, the 640 training step at 1,000 vs 100 boxes (dense.py; not in 'all').
  eval         COCO evaluation: eval.backend='faster_coco_eval' against pycocotools (evaluation.py;
               not in 'all').

Every row times ours and the peer alternately (ours, peer, peer, ours, ...) and reports medians of
the wall-clock time and of this process's CPU time, and the ratios peer / ours (> 1: we are faster).
FLOP/s use XLA's FLOP count of our compiled program for both (the same network does the same work),
set against the float32 matrix-multiply rate measured in the same run ('machine' row). Machines are
shared and noisy: compare ratios of one run, not absolute times across runs; the CPU-time ratio is the
one that survives a busy machine.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")  # for docs/benchmarks.md

from absl import app, flags

from benchmarks import timing  # imports no JAX
from retinanet_jax.runtime import xla_flags  # imports no JAX

FLAGS = flags.FLAGS
DEFAULTS = timing.Options()
flags.DEFINE_enum("suite", "core", timing.SUITES, "Which cases to run.")
flags.DEFINE_bool("quick", False, "Tiny shapes and one repeat: checks that the script runs.")
flags.DEFINE_integer("repeats", DEFAULTS.repeats, "Timed repeats per case and side (after one warm-up).")
flags.DEFINE_bool("write", False, "Write the table (and profiles) into docs/benchmarks.md.")
flags.DEFINE_bool("profile", False, "Also profile our training step and inference per XLA operation, "
                  "and torchvision's per ATen operator.")
flags.DEFINE_string("xla_flags", None, "XLA flags added to $XLA_FLAGS; default: "
                    "retinanet_jax.runtime.xla_flags.CPU_FLAGS (--quick: QUICK_XLA_FLAGS). Pass an empty "
                    "value for XLA's defaults.")
flags.DEFINE_integer("torch_threads", DEFAULTS.torch_threads, "torch.set_num_threads (0: torch's default).")
flags.DEFINE_string("data_dir", DEFAULTS.data_dir,
                    "Where the input suite builds its stand-in JPEG dataset (once).")
flags.DEFINE_float("input_seconds", DEFAULTS.input_seconds, "Seconds per input-pipeline measurement.")
flags.DEFINE_bool("compile_cache_rows", DEFAULTS.compile_cache_rows, "train suite: also measure the "
                  "first step in new processes with the persistent compilation cache (two extra "
                  "processes).")
flags.DEFINE_list("accelerator_sizes", [str(s) for s in DEFAULTS.accelerator_sizes],
                  "accelerator suite: training image sizes.")
flags.DEFINE_list("accelerator_batches", [str(b) for b in DEFAULTS.accelerator_batches],
                  "accelerator suite: training batch sizes tried in order; the largest that fits in "
                  "device memory is measured.")
flags.DEFINE_float("peak_tflops", DEFAULTS.peak_tflops, "accelerator suite: the device's dense "
                   "bfloat16 peak in TFLOP/s for the model FLOP utilization (0: looked up from the "
                   "device kind).")
flags.DEFINE_string("compile_cache_child", None, "Internal: run the compile-cache measurement in this "
                    "process with this cache directory and print its result.")

QUICK_XLA_FLAGS = ("--xla_backend_optimization_level=0",)  # LLVM -O0, XLA's own convolutions


def options_from_flags() -> timing.Options:
  return timing.Options(
      quick=FLAGS.quick, repeats=FLAGS.repeats, profile=FLAGS.profile,
      torch_threads=FLAGS.torch_threads, data_dir=FLAGS.data_dir, input_seconds=FLAGS.input_seconds,
      compile_cache_rows=FLAGS.compile_cache_rows,
      accelerator_sizes=tuple(int(v) for v in FLAGS.accelerator_sizes),
      accelerator_batches=tuple(int(v) for v in FLAGS.accelerator_batches),
      peak_tflops=FLAGS.peak_tflops, script=os.path.abspath(__file__))


def main(argv):
  del argv
  if FLAGS.xla_flags is not None:
    xla_flags.apply_xla_flags(FLAGS.xla_flags)
  else:  # --quick is a smoke test: whatever compiles fastest (3x); its times mean nothing
    xla_flags.apply_xla_flags(QUICK_XLA_FLAGS if FLAGS.quick else xla_flags.CPU_FLAGS)
  # torch first: importing torchvision (triton) after TensorFlow crashes in native code.
  import torch
  import torchvision  # noqa: F401  pylint: disable=unused-import

  from benchmarks import report, training  # pylint: disable=import-outside-toplevel

  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  if FLAGS.compile_cache_child:
    result = training.compile_cache_child(FLAGS.compile_cache_child, FLAGS.quick)
    print("COMPILE_CACHE_RESULT " + json.dumps(result), flush=True)
    return
  started = time.time()
  session = timing.Session(options_from_flags())
  rows = report.run(FLAGS.suite, session)
  command = " ".join(["python scripts/benchmark.py"] + sys.argv[1:])
  header = (f"Measured {datetime.datetime.now().isoformat(timespec='minutes')} in "
            f"{(time.time() - started) / 60:.0f} min on {report.machine_description(session)}.\n"
            f"Command: `{command}`.")
  table = report.format_table(rows, matmul_flops_per_second=session.matmul_flops_per_second)
  print(header + "\n\n" + table)
  for profile in session.profiles:
    print("\n" + profile)
  if FLAGS.write:
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    # One section per suite ('all': the main table), so that a device run never replaces the CPU table.
    report.write_section(path, "benchmark" if FLAGS.suite == "all" else f"benchmark-{FLAGS.suite}",
                         header + "\n\n" + table)
    if session.profiles:
      report.write_section(path, "profile", "\n".join(session.profiles))


if __name__ == "__main__":
  app.run(main)
