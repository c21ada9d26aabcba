"""SIGKILL at random moments (a random step, during an Orbax save, right after an input position was
written), restart with the same command each time: the run ends with the parameters of an
uninterrupted run, bit for bit, and every step's loss equals the uninterrupted run's."""

import json
import os
import random
import signal
import time

import numpy as np
import pytest

from tests.helpers import runs

STEPS = 20
SEED = int(os.environ.get("RESUME_TEST_SEED", "5"))
OVERRIDES = {"eval.at_end": False}  # evaluation does not change training; the reference evaluates


def _entries(workdir, part):
  folder = os.path.join(workdir, part)
  return os.listdir(folder) if os.path.isdir(folder) else []


def _last_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  lines = [l for l in open(path).read().splitlines() if l.endswith("}")]
  return json.loads(lines[-1])["step"] if lines else 0


def _saving(workdir):
  """The step of an Orbax save in progress (its temporary folder exists), or None."""
  for name in _entries(workdir, "checkpoints"):
    if ".orbax-checkpoint-tmp" in name:
      return int(name.split(".")[0])
  return None


def _fresh_input_position(workdir, since):
  """A step whose input position folder holds a file written after `since` (a time) and whose
  checkpoint is not committed, or None. (A killed run leaves such folders; the next run deletes them
  first. The folder's own mtime is no witness: deleting the files in it updates it too, so a poll
  during that deletion took the old folder for a fresh one.)"""
  committed = set(_committed(workdir))
  folder = os.path.join(workdir, "input_state")
  pending = []
  for name in _entries(workdir, "input_state"):
    if not name.isdigit() or int(name) in committed:
      continue
    try:
      files = os.listdir(os.path.join(folder, name))
      written = [os.path.getmtime(os.path.join(folder, name, f)) for f in files]
    except FileNotFoundError:  # deleted meanwhile
      continue
    if any(t > since for t in written):
      pending.append(int(name))
  return max(pending) if pending else None


def _kill_when(procs, workdir, condition, timeout=600):
  """Polls every 2 ms; SIGKILLs the run as soon as `condition()` is true. Returns its value."""
  began = time.time()
  while True:
    value = condition()
    if value:
      break
    if any(p.poll() is not None for p in procs):
      runs.wait(procs, workdir)
      raise AssertionError("the run ended before the moment it was to be killed at")
    if time.time() - began > timeout:
      raise AssertionError("timed out waiting for the moment to kill")
    time.sleep(0.002)
  for p in procs:
    os.kill(p.pid, signal.SIGKILL)
  for p in procs:
    assert p.wait() == -signal.SIGKILL
  return value


def _committed(workdir):
  return runs.checkpoint_steps(workdir) if _entries(workdir, "checkpoints") else []


def test_killed_three_times_resumes_to_the_parameters_of_an_uninterrupted_run(tmp_path_factory,
                                                                                tmp_path):
  reference = runs.reference_run(tmp_path_factory)
  data_dir, cache_dir = runs.session_dirs(tmp_path_factory)
  workdir = str(tmp_path / "run")
  rng = random.Random(SEED)
  start = lambda: runs.start(workdir, data_dir=data_dir, cache_dir=cache_dir, overrides=OVERRIDES)
  expected_resume = []  # the step each restart must resume from

  # 1. At a random step.
  k = rng.randint(3, 12)
  _kill_when(start(), workdir, lambda: _last_step(workdir) >= k)
  expected_resume.append(max(_committed(workdir), default=0))
  print(f"killed after step {k} was logged; committed checkpoints {_committed(workdir)}")

  # 2. While Orbax writes a checkpoint (its temporary folder exists); the save must not have
  # completed when the process died. If it had (a race lost), try again at the next save.
  for _ in range(3):
    saving = _kill_when(start(), workdir, lambda: _saving(workdir))
    committed = _committed(workdir)
    expected_resume.append(max(committed, default=0))
    if _saving(workdir) == saving and saving not in committed:
      break
  else:
    pytest.fail("could not kill the run during a checkpoint save in 3 tries")
  print(f"killed while saving step {saving}; committed {committed}")
  assert max(committed, default=0) < saving  # the next run resumes before the half-written one

  # 3. Right after the input position of a step was (being) written, before its checkpoint.
  launched = time.time()
  fresh = _kill_when(start(), workdir, lambda: _fresh_input_position(workdir, launched))
  assert fresh not in _committed(workdir)
  expected_resume.append(max(_committed(workdir), default=0))
  print(f"killed after writing the input position of step {fresh}; committed {_committed(workdir)}")

  # 4. To the end.
  runs.wait(start(), workdir)

  log = open(os.path.join(workdir, "log.txt")).read()
  resumed = [int(l.split()[3]) for l in log.splitlines() if l.startswith("Resumed from step")]
  assert resumed == [s for s in expected_resume if s > 0], (resumed, expected_resume)
  assert not [n for n in _entries(workdir, "checkpoints") if "tmp" in n]
  assert sorted(_entries(workdir, "input_state")) == [str(s) for s in _committed(workdir)]

  # Every loss ever logged (steps replayed after a restart included) equals the reference's.
  want = runs.losses(reference)
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  got = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
  assert {s for s, _ in got} == set(range(1, STEPS + 1))
  assert len(got) > STEPS  # some steps ran twice
  assert all(loss == want[s] for s, loss in got), [(s, l, want[s]) for s, l in got if l != want[s]]
  for a, b in zip(runs.params(workdir, STEPS), runs.params(reference, STEPS)):
    np.testing.assert_array_equal(a, b)
