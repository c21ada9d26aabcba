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


def _coco_ap(ground_truth: dict, detections: list) -> dict:
  """pycocotools' own 12 numbers, straight from COCOeval (the independent re-scoring)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel

  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
  from pycocotools.cocoeval import COCOeval  # pylint: disable=import-outside-toplevel
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = ground_truth
    gt.createIndex()
    evaluation = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), iouType="bbox")  # a copy:
    # loadRes adds keys to the dicts it is given
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
  return dict(zip(names, (float(x) for x in evaluation.stats)))


def test_evaluate_writes_its_detections_and_scores_a_results_file_alone(tmp_path_factory):
  """evaluate.py --output writes the detections it scored: pycocotools on that file gives its
  metrics, and `--detections=FILE` (no model) gives them again; --mode=predict writes the file the
  COCO server expects, for the images of the image-info file only."""
  from retinanet_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from retinanet_jax import data as data_lib  # pylint: disable=import-outside-toplevel

  workdir = runs.reference_run(tmp_path_factory)
  out = tmp_path_factory.mktemp("evaluate_outputs")
  evaluate = os.path.join(REPO, "scripts", "evaluate.py")
  _run([evaluate, f"--checkpoint={workdir}", f"--output={out / 'eval'}"], tmp_path_factory,
       cwd=str(out))
  with open(out / "eval" / "eval_20.json") as f:
    written = json.load(f)
  with open(out / "eval" / "detections_20.json") as f:
    detections = json.load(f)
  assert written["num_detections"] == len(detections) > 0
  ground_truth = data_lib.coco_ground_truth(config_lib.load_run_config(workdir).data)
  independent = _coco_ap(ground_truth, detections)
  assert independent == pytest.approx({k: written["metrics"][k] for k in independent}, abs=1e-9)

  # The same file, scored with no model: the run's own numbers, counting included.
  printed = _run([evaluate, f"--detections={out / 'eval' / 'detections_20.json'}",
                  f"--checkpoint={workdir}", f"--output={out / 'rescored'}"], tmp_path_factory,
                 cwd=str(out))
  with open(out / "rescored" / "eval_detections_20.json") as f:
    rescored = json.load(f)["metrics"]
  assert rescored == pytest.approx(runs.eval_metrics(workdir, 20), abs=1e-9)
  assert "AP50" in printed and "count MAE" in printed

  # Prediction: an image-info file (images and categories, no annotations) names the images.
  kept = sorted(im["id"] for im in ground_truth["images"])[::2]
  info = {"images": [im for im in ground_truth["images"] if im["id"] in kept],
          "categories": ground_truth["categories"]}
  (out / "image_info_tiny-dev.json").write_text(json.dumps(info))
  printed = _run([evaluate, f"--checkpoint={workdir}", "--mode=predict", f"--output={out / 'sub'}",
                  f"--config={runs.CONFIG}", f"--config.data.data_dir={runs.session_dirs(tmp_path_factory)[0]}",
                  f"--config.data.eval_annotations={out / 'image_info_tiny-dev.json'}"],
                 tmp_path_factory, cwd=str(out))
  with open(out / "sub" / "detections_tiny-dev_retinanet-jax_results.json") as f:
    submitted = json.load(f)
  assert {d["image_id"] for d in submitted} <= set(kept)
  assert submitted == [d for d in detections if d["image_id"] in kept]
  assert f"{len(ground_truth['images']) - len(kept)} images of the split" in printed
