"""Several processes (jax.distributed over 127.0.0.1, gloo CPU collectives): 2 processes x 2 devices
train and evaluate like 1 process x 4 devices, only process 0 writes, and a checkpoint written by 2
processes continues exactly on 1.

"Like" means: the same global batch at every step (positive-anchor counts, exact integers that depend
on the batch only, are equal), and losses equal to 1e-5 over 20 steps. Not bitwise: gloo adds the
devices in ring order, XLA's in-process collectives in device order, and XLA:CPU's kernels round
differently with 2 and 4 devices per process (docs/multihost.md). The tiny config uses the smooth L1
box loss because GIoU's gradient jumps make training amplify such rounding (tests/helpers/tiny_config.py).
"""

import json
import os
import shutil

import numpy as np
import pytest

from retinanet_jax import evaluation
from tests.helpers import runs

STEPS = 20


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  data_dir, cache_dir = runs.session_dirs(tmp_path_factory)
  workdir = str(tmp_path_factory.mktemp("two_processes") / "run")
  runs.run(workdir, data_dir=data_dir, cache_dir=cache_dir, processes=2, devices_per_process=2,
           overrides={"eval.num_images_png": 2})
  return workdir


def test_two_processes_give_the_losses_and_ap_of_one(tmp_path_factory, two_processes):
  one = runs.losses(runs.reference_run(tmp_path_factory))
  two = runs.losses(two_processes)
  steps = list(range(1, STEPS + 1))
  assert sorted(one) == sorted(two) == steps
  one, two = np.array([one[s] for s in steps]), np.array([two[s] for s in steps])
  print(f"max |loss difference| over {STEPS} steps: {np.abs(one - two).max():.2e}")
  np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)  # measured here: at most 1.2e-7
  assert one[-1] < 0.9 * one[0]  # it trained: the batches, not only the start, must agree
  ap_one = runs.eval_metrics(runs.reference_run(tmp_path_factory), STEPS)
  ap_two = runs.eval_metrics(two_processes, STEPS)
  print(f"AP one process {ap_one['AP']:.6f}, two processes {ap_two['AP']:.6f}")
  for name in evaluation.METRIC_NAMES:
    assert ap_two[name] == pytest.approx(ap_one[name], abs=1e-6), name
  assert ap_one["AR100"] > 0


def test_two_processes_see_the_batches_of_one(tmp_path_factory, two_processes):
  """The same global batch at every step: exact integer counts of positive anchors (they depend on
  the batch only, not on the parameters, so rounding cannot make them drift)."""
  alone = runs.metrics(runs.reference_run(tmp_path_factory))
  two = runs.metrics(two_processes)
  steps = list(range(1, STEPS + 1))
  positives = lambda m: [m[s]["train/num_positives"] for s in steps]
  assert positives(two) == positives(alone)
  assert len(set(positives(alone))) > 5  # the counts tell batches apart


def test_only_process_zero_writes_and_evaluation_sees_every_image_once(two_processes):
  log = open(os.path.join(two_processes, "log.txt")).read()
  assert "Mesh: 4 devices (2 local) on 2 processes" in log
  assert log.count(f"step {STEPS}/{STEPS} ") == 1 and log.count("Evaluation at step") == 1
  assert "Evaluation at step 20 (16 images" in log
  assert f"step {STEPS}/{STEPS} " not in open(os.path.join(two_processes, "out_1.txt")).read()
  records = [json.loads(l) for l in open(os.path.join(two_processes, "metrics.jsonl"))]
  steps = [r["step"] for r in records if "train/loss" in r]
  assert steps == list(range(1, STEPS + 1))  # one line per step: one writer
  assert [r["step"] for r in records if "eval/AP" in r] == [STEPS]
  assert len(os.listdir(os.path.join(two_processes, "tensorboard"))) == 1
  assert os.path.isfile(os.path.join(two_processes, f"detections_{STEPS}.png"))
  detections = json.load(open(os.path.join(two_processes, f"detections_{STEPS}.json")))
  assert 0 < len({d["image_id"] for d in detections}) <= 16
  # Checkpoints written once, with each process's input position beside them.
  steps = runs.checkpoint_steps(two_processes)
  assert {15, 20} <= set(steps) <= {5, 10, 15, 20}  # keep_checkpoints=2 (Orbax may lag one)
  assert sorted(os.listdir(os.path.join(two_processes, "input_state"))) == sorted(map(str, steps))
  assert not [n for n in os.listdir(os.path.join(two_processes, "checkpoints")) if "tmp" in n]
  positions = [json.load(open(os.path.join(two_processes, "input_state", "20",
                                           f"input_process_{i:05d}.json"))) for i in range(2)]
  assert [p["batches"] for p in positions] == [STEPS, STEPS]
  assert [p["process_count"] for p in positions] == [2, 2]


def test_a_two_process_checkpoint_continues_exactly_on_one_process(tmp_path_factory, two_processes,
                                                                   tmp_path):
  data_dir, cache_dir = runs.session_dirs(tmp_path_factory)
  reference = runs.reference_run(tmp_path_factory)
  workdir = tmp_path / "moved"
  for part in ("checkpoints", "input_state"):
    shutil.copytree(os.path.join(two_processes, part, "15"), workdir / part / "15")
  runs.run(str(workdir), data_dir=data_dir, cache_dir=cache_dir,
           overrides={"eval.at_end": False})
  assert "Resumed from step 15" in open(workdir / "log.txt").read()
  moved, one, two = (runs.losses(w) for w in (str(workdir), reference, two_processes))
  assert sorted(moved) == list(range(16, STEPS + 1))
  for s in moved:  # the input position of 2 processes, restored on 1: the same batches
    assert moved[s] == pytest.approx(one[s], abs=1e-5) and moved[s] == pytest.approx(two[s], abs=1e-5)
  # Parameters: the first 15 steps ran on 2 processes (other rounding, see the module docstring),
  # the last 5 on 1.
  for a, b in zip(runs.params(str(workdir), STEPS), runs.params(reference, STEPS)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
