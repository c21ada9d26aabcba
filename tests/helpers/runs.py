"""Launching scripts/train.py as one or several processes, and reading back what a run wrote.

Every run uses `tests/helpers/tiny_config.py` and JAX's persistent compilation cache (a folder per
test session), so that a restarted process loads its compiled steps instead of compiling again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRAIN = os.path.join(REPO, "scripts", "train.py")
CONFIG = os.path.join(REPO, "tests", "helpers", "tiny_config.py")


_SHARED: dict = {}


def session_dirs(tmp_path_factory) -> tuple[str, str]:
  """(data_dir, compilation cache dir), one pair per test session."""
  if "dirs" not in _SHARED:
    root = tmp_path_factory.mktemp("subprocess_runs")
    _SHARED["dirs"] = (str(root / "tfds"), str(root / "jax_cache"))
  return _SHARED["dirs"]


def reference_run(tmp_path_factory) -> str:
  """The workdir of one uninterrupted 1-process x 4-device run of the tiny config (20 steps,
  evaluated at the end), made once per test session."""
  if "reference" not in _SHARED:
    data_dir, cache_dir = session_dirs(tmp_path_factory)
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    run(workdir, data_dir=data_dir, cache_dir=cache_dir)
    _SHARED["reference"] = workdir
  return _SHARED["reference"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(*, devices: int, cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def command(workdir: str, *, data_dir: str, overrides: dict | None = None) -> list[str]:
  args = [sys.executable, TRAIN, f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}"]
  for key, value in (overrides or {}).items():
    args.append(f"--config.{key}={value}")
  return args


def start(workdir: str, *, data_dir: str, cache_dir: str, processes: int = 1,
          devices_per_process: int = 4, overrides: dict | None = None) -> list[subprocess.Popen]:
  """Starts `processes` cooperating processes of one run; their output goes to workdir/out_<i>.txt."""
  os.makedirs(workdir, exist_ok=True)
  base = command(workdir, data_dir=data_dir, overrides=overrides)
  port = free_port()
  procs = []
  for i in range(processes):
    args = list(base)
    if processes > 1:
      args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
               f"--process_id={i}"]
    out = open(os.path.join(workdir, f"out_{i}.txt"), "a")
    procs.append(subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  env=environment(devices=devices_per_process, cache_dir=cache_dir)))
  return procs


def wait(procs: list[subprocess.Popen], workdir: str, *, timeout: float = 600) -> None:
  """Waits for every process; fails with the tail of their output if one did not exit with 0."""
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      codes.append("timeout")
  if any(c != 0 for c in codes):
    tails = []
    for i in range(len(procs)):
      with open(os.path.join(workdir, f"out_{i}.txt")) as f:
        tails.append(f"--- process {i} ---\n" + "".join(f.readlines()[-40:]))
    raise AssertionError(f"exit codes {codes}\n" + "\n".join(tails))


def run(workdir: str, **kwargs) -> None:
  wait(start(workdir, **kwargs), workdir)


def metrics(workdir: str) -> dict[int, dict]:
  """workdir/metrics.jsonl as {step: record}; a step logged again after a restart keeps its last."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      out.setdefault(record["step"], {}).update(record)
  return out


def losses(workdir: str) -> dict[int, float]:
  return {s: r["train/loss"] for s, r in metrics(workdir).items() if "train/loss" in r}


def checkpoint_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def params(workdir: str, step: int) -> list[np.ndarray]:
  """The model state (trainable and not) of checkpoint `step`, as a flat list of NumPy arrays."""
  import jax  # pylint: disable=import-outside-toplevel

  from retinanet_jax import checkpoints  # pylint: disable=import-outside-toplevel
  state, _ = checkpoints.read_model_state(os.path.join(workdir, "checkpoints", str(step)))
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def eval_metrics(workdir: str, step: int) -> dict[str, float]:
  with open(os.path.join(workdir, f"eval_{step}.json")) as f:
    return json.load(f)["metrics"]
