"""scripts/evaluate.py and scripts/detect.py on a training run's workdir, as a user types them: no
--config (the checkpoint describes its model, the run's config.json its data)."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path_factory, cwd):
  _, cache_dir = runs.session_dirs(tmp_path_factory)
  env = runs.environment(devices=4, cache_dir=cache_dir)  # as the run
  done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  return done.stdout


def test_evaluate_and_detect_a_training_workdir_without_config(tmp_path_factory):
  workdir = runs.reference_run(tmp_path_factory)
  out = tmp_path_factory.mktemp("saved_run_scripts")
  # From another folder: the package is installed, the scripts edit no sys.path.
  printed = _run([os.path.join(REPO, "scripts", "evaluate.py"), f"--checkpoint={workdir}",
                  f"--output={out / 'eval'}"], tmp_path_factory, cwd=str(out))
  with open(out / "eval" / "eval_20.json") as f:
    written = json.load(f)["metrics"]
  # The run's own evaluation at its last step, from the restored model alone.
  assert written == pytest.approx(runs.eval_metrics(workdir, 20), abs=1e-6)
  assert "AP50" in printed

  image = out / "photo.png"
  Image.new("RGB", (80, 60), (120, 40, 200)).save(image)
  _run([os.path.join(REPO, "scripts", "detect.py"), f"--checkpoint={workdir}",
        f"--output={out / 'detect'}", str(image)], tmp_path_factory, cwd=str(out))
  assert os.path.isfile(out / "detect" / "photo.detections.png")
  with open(out / "detect" / "detections.json") as f:
    detections = json.load(f)
  count = sum(d["score"] >= 0.5 for d in detections)  # --count_threshold: --draw_threshold's 0.5
  with open(out / "detect" / "images.json") as f:
    assert json.load(f) == [{"id": 0, "file_name": "photo.png", "path": str(image),
                             "output_file": "photo.detections.png", "height": 60, "width": 80,
                             "count": count, "count_threshold": 0.5}]
  with open(os.path.join(workdir, "label_map.json")) as f:
    category_ids = {row["category_id"] for row in json.load(f)["labels"]}
  assert {d["category_id"] for d in detections} <= category_ids
