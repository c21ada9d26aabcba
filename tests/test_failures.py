"""Runs that fail well, as a user meets them: scripts/train.py on the tiny config (subprocesses, the
compilation cache of the session shared) with a damaged checkpoint and with a learning rate far too
high. Each ends with one clear paragraph or warning naming the step, the documented exit code
(docs/failures.md, "Exit codes"), and no traceback. The other half (exit codes of every error kind, damaged
input positions, the guard's arithmetic) is checked in-process: tests/test_errors.py,
tests/test_checkpoints.py, tests/test_train_step.py."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from tests.helpers import runs
from tests.test_checkpoints import truncate_largest_array_file


def _train(workdir, tmp_path_factory, **overrides):
  """scripts/train.py on the tiny config; returns (exit code, stdout, stderr)."""
  data_dir, cache_dir = runs.session_dirs(tmp_path_factory)
  done = subprocess.run(runs.command(workdir, data_dir=data_dir, overrides=overrides), cwd=runs.REPO,
                        env=runs.environment(devices=4, cache_dir=cache_dir), capture_output=True,
                        text=True, timeout=900, check=False)
  return done.returncode, done.stdout, done.stderr


def _flat(text):
  """`text` with every run of whitespace as one space (messages are wrapped at 100 columns)."""
  return " ".join(text.split())


def _no_traceback(*texts):
  for text in texts:
    assert "Traceback" not in text, text[-3000:]


def test_a_damaged_latest_checkpoint_falls_back_and_ends_as_an_uninterrupted_run(tmp_path_factory):
  reference = runs.reference_run(tmp_path_factory)  # 20 steps, checkpoints 15 and 20 kept
  workdir = str(tmp_path_factory.mktemp("damaged") / "run")
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("compilation_cache"))
  cut = truncate_largest_array_file(os.path.join(workdir, "checkpoints", "20"))

  # Policy 'stop': one paragraph naming the step and the folder, exit code 4, nothing moved.
  code, out, err = _train(workdir, tmp_path_factory, **{"train.on_damaged_checkpoint": "stop"})
  _no_traceback(out, err)
  assert code == 4, err[-3000:]
  assert _flat(err).startswith(f"error: checkpoint step 20 in {workdir}/checkpoints/20 is damaged")
  assert "on_damaged_checkpoint=fall_back" in err and not os.path.exists(f"{workdir}/damaged")
  assert len(err.strip().split("\n\n")) == 1  # one paragraph

  # Default 'fall_back': set aside (kept), resume from step 15, end where the reference ended.
  code, out, err = _train(workdir, tmp_path_factory, **{"eval.at_end": False})
  _no_traceback(out, err)
  assert code == 0, err[-3000:]
  assert f"Warning: checkpoint step 20 in {workdir}/checkpoints/20 is damaged" in out
  assert f"moved, not deleted, to {workdir}/damaged/checkpoint_20 and" in out
  assert "Resumed from step 15" in out
  kept = cut.replace(os.path.join(workdir, "checkpoints", "20"),
                     os.path.join(workdir, "damaged", "checkpoint_20"))
  assert os.path.getsize(kept) == 1000  # the damaged folder, as it was
  assert os.path.isdir(os.path.join(workdir, "damaged", "input_state_20"))
  assert runs.checkpoint_steps(workdir) == [15, 20]
  for a, b in zip(runs.params(workdir, 20), runs.params(reference, 20), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def diverging(tmp_path_factory):
  """The tiny config at learning rate 1e4 (AdamW, clipping off): the loss goes from 1.8 to ~4e7
  at step 2 and stays at 1e6-1e9, finite. Run with the default policy, then with 'stop'."""
  overrides = {"train.base_lr": 1e4, "train.grad_clip_norm": 0.0, "train.steps": 8,
               "train.checkpoint_every": 1, "train.keep_checkpoints": 10, "eval.at_end": False}
  root = tmp_path_factory.mktemp("diverging")
  warn = _train(str(root / "warn"), tmp_path_factory, **overrides)
  stop = _train(str(root / "stop"), tmp_path_factory, **overrides, **{"train.on_divergence": "stop"})
  return root, warn, stop


def test_a_diverging_run_is_warned_about_by_step_and_summarized(diverging):
  root, (code, out, err), _ = diverging
  _no_traceback(out, err)
  assert code == 0, err[-3000:]
  losses = runs.losses(str(root / "warn"))
  assert losses[1] < 3 and all(np.isfinite(v) and v > 1e4 for s, v in losses.items() if s > 1)
  warnings = [l for l in out.splitlines() if l.startswith("Warning: the loss diverged")]
  assert len(warnings) == 1 and warnings[0].startswith("Warning: the loss diverged at step 2: 3 "
                                                       "steps in a row"), out
  assert "Divergence guard (warn): 1 divergence (the latest from step 2)" in out
  # The warning comes when the third step above the threshold is checked: before step 4's line.
  assert out.index("Warning: the loss diverged") < out.index("step 4/8")


def test_a_diverging_run_with_stop_stops_there_without_a_traceback(diverging):
  root, _, (code, out, err) = diverging
  _no_traceback(out, err)
  assert code == 5, err[-3000:]
  assert _flat(err).startswith("error: the loss diverged at step 2"), err
  assert f"the last checkpoint before it is step 1 in {root}/stop/checkpoints" in _flat(err)
  assert "step 4/8" not in out and "step 3/8" in out  # stopped at step 4, when it was declared
  assert len(err.strip().split("\n\n")) == 1  # one paragraph
