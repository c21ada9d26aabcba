"""The console a person reads: the README's main job (its `smoke` variant, composed with another
synthetic knob) prints this project's lines only, the libraries' lines go to log.txt; the progress
line is drawn on terminals only."""

import io
import logging
import os
import re
import subprocess
import sys
import types

from retinanet_jax.runtime import console
from tests.helpers import runs

# absl's and glog's line prefix ("I1203 06:24:53.658095 1404... file.py:12]"), tqdm's rates.
LIBRARY_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|it/s\]|examples/s\]|oneDNN|orbax|"
                          r"Downloading and preparing|absl::InitializeLog", re.MULTILINE | re.I)


def test_the_main_jobs_smoke_variant_prints_only_our_lines(tmp_path_factory):
  data_dir, cache_dir = runs.session_dirs(tmp_path_factory)
  workdir = str(tmp_path_factory.mktemp("smoke") / "run")
  # 8 validation images: the smoke variant evaluates its whole validation split (it composes).
  command = [sys.executable, os.path.join(runs.REPO, "scripts", "train.py"),
             "--config=" + os.path.join(runs.REPO, "configs", "synthetic.py") + ":smoke",
             f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
             "--config.data.synthetic.num_validation=8"]
  done = subprocess.run(command, cwd=runs.REPO, env=runs.environment(devices=1, cache_dir=cache_dir),
                        capture_output=True, text=True, timeout=900, check=False)
  out = done.stdout + done.stderr
  assert done.returncode == 0, out[-4000:]
  assert "Traceback" not in out
  assert not LIBRARY_LINE.search(out), LIBRARY_LINE.search(out).group(0) + "\n" + out
  lines = out.splitlines()
  assert lines[0].startswith("Config: resnet18 (6 classes) on synthetic 'train', 3 steps of 16")
  for expected in ("step 3/3  loss", "Evaluation at step 3 (8 images", "    AP |   AP50",
                   "Divergence guard (warn): 0 divergences", "Input: 48 images read"):
    assert any(l.startswith(expected) for l in lines), (expected, out)
  assert len(lines) < 25, out
  with open(os.path.join(workdir, "log.txt")) as f:
    log = f.read()
  # The libraries' lines were kept, in the log: Orbax's checkpoint internals, TFDS building.
  assert "checkpoint_manager.py" in log and "retinanet_synthetic" in log
  assert all(l in log for l in lines if l.startswith("step "))


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_the_progress_line_is_drawn_on_a_terminal_only():
  terminal, pipe = _Terminal(), io.StringIO()
  for stream in (terminal, pipe):
    line = console.ProgressLine(stream)
    line.show("Evaluating 8 images: 0/2 batches", force=True)
    line.show("Evaluating 8 images: 1/2 batches", force=True)
    line.done()
  assert pipe.getvalue() == ""
  assert terminal.getvalue() == ("\rEvaluating 8 images: 0/2 batches\x1b[K"
                                 "\rEvaluating 8 images: 1/2 batches\x1b[K\r\x1b[K")
  assert "\n" not in terminal.getvalue()  # one line, rewritten
  assert list(console.progress(range(3), desc="x", total=3)) == [0, 1, 2]


def test_leftovers_of_a_failed_checkpoint_read_go_to_the_log_file(tmp_path, monkeypatch):
  log_path = str(tmp_path / "log.txt")
  monkeypatch.setitem(console._state, "log_path", log_path)  # pylint: disable=protected-access
  passed_on = []
  hook = console._quiet_unraisable(passed_on.append)  # pylint: disable=protected-access

  def unraisable_from(filename):
    code = compile("raise Exception('Encountered error while reading array index')", filename,
                   "exec")
    try:
      exec(code, {})  # pylint: disable=exec-used
    except Exception as error:  # pylint: disable=broad-except
      return types.SimpleNamespace(exc_type=type(error), exc_value=error,
                                   exc_traceback=error.__traceback__, err_msg=None, object=None)
    raise AssertionError("not raised")

  hook(unraisable_from("/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py"))
  hook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                             exc_traceback=None, err_msg=None, object=None))
  assert passed_on == []
  with open(log_path) as f:
    assert f.read().count("(ignored after a failed read)") == 2
  ours = unraisable_from("/work/retinanet_jax/training/train.py")
  hook(ours)
  assert passed_on == [ours]  # anything else still reaches Python's default hook


def test_log_records_carrying_a_failed_checkpoint_read_stay_off_the_console():
  """asyncio's "Task exception was never retrieved" for an orbax read task (CI saw it on stderr,
  with absl's E-prefix) is filtered from the console handler; other errors pass."""
  leftovers = console._CheckpointReadLeftovers()  # pylint: disable=protected-access
  code = compile("raise Exception('Encountered error while reading array index')",
                 "/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec")
  try:
    exec(code, {})  # pylint: disable=exec-used
  except Exception:  # pylint: disable=broad-except
    exc_info = sys.exc_info()

  def record(message, exc=None):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, (), exc)

  assert not leftovers.filter(record("Task exception was never retrieved", exc_info))
  assert not leftovers.filter(record(
      'Traceback (most recent call last):\n  File "/x/site-packages/tensorstore/__init__.py", ...'))
  assert leftovers.filter(record("Task exception was never retrieved"))
  try:
    raise ValueError("ours")
  except ValueError:
    assert leftovers.filter(record("an error of ours", sys.exc_info()))
