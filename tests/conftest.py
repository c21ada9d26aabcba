"""Test-wide set-up: 4 host CPU devices, so multi-device code (shard_map over 'data') runs on this
CPU-only machine. Must run before jax is imported by any test module."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# torch must load before TensorFlow: once TensorFlow's libraries are in the process, loading Triton
# (which torch._dynamo imports, e.g. from torchvision ops) segfaults (torch 2.14.1, triton 3.8.0,
# tensorflow-cpu 2.21). Scripts that use both (scripts/benchmark.py) import torch first too.
import torch  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
import torch._dynamo  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
