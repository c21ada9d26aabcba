"""Benchmarks against torchvision, side by side in one process (`scripts/benchmark.py` runs them).

Needs the test extras (torch, torchvision: requirements-test.txt). Modules, one per suite plus the
shared parts:

  timing.py          Options, Session (the run's state), Timing and Row, side-by-side timing, the
                     'machine' row (the float32 matmul rate every FLOP/s is set against).
  networks.py        the two RetinaNets with the same weights, both training steps, per-operator
                     profiles.
  core.py            focal loss, matching, post-processing.
  inference.py       the model suite: inference at 512x512 and 800x1333.
  training.py        the train suite: the training step, its first step, the persistent cache.
  input_pipeline.py  the input suite: tf.data against torchvision's transforms.
  accelerator.py     bfloat16 on a GPU/TPU against torchvision with AMP.
  report.py          which cases a suite runs, running them, the table and docs/benchmarks.md.
  profiling.py       per-XLA-operation profiles of a compiled program, XLA's FLOP count.
  input_data.py      the input pipeline's images/s on this host, the COCO-like stand-in dataset.

Each case is `bench_*(session) -> list[Row]`.
"""
