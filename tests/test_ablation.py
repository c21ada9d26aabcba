"""scripts/ablation.py refuses before any work: a non-empty --output (never overwritten), every bad
setting at once, --resume on a folder it did not write. A whole (tiny) ablation runs in
tests/test_notebooks.py, through notebooks/ablation.ipynb."""

import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(REPO, "scripts", "ablation.py")


def run(*flags):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, SCRIPT, "--config=configs/synthetic.py", *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_refuses_a_folder_that_holds_files(tmp_path):
  (tmp_path / "mine.txt").write_text("a user's file")
  done = run(f"--output={tmp_path}")
  assert done.returncode == 1
  assert f"--output {tmp_path} exists and is not an empty folder; nothing was run" in done.stderr
  assert sorted(os.listdir(tmp_path)) == ["mine.txt"]
  assert (tmp_path / "mine.txt").read_text() == "a user's file"


def test_every_bad_setting_in_one_message(tmp_path):
  done = run(f"--output={tmp_path / 'new'}", "--alphas=2,x", "--gammas=-1,1", "--tuned_alphas=3")
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  for problem in ("--alphas: 2.0 is not in [0.0, 1.0]", "--alphas: 'x' is not a number",
                  "--gammas: -1.0 is not in [0.0, inf]", "--tuned_alphas: '3' is not gamma:alpha",
                  "--tuned_alphas: no alpha for gamma [1.0]"):
    assert problem in last, (problem, last)
  assert not (tmp_path / "new").exists()


def test_resume_needs_an_ablation_folder(tmp_path):
  done = run(f"--output={tmp_path}", "--resume")
  assert done.returncode == 1
  assert "holds no plan.json (not an ablation folder)" in done.stderr
  assert os.listdir(tmp_path) == []
