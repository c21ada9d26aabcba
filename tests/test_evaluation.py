"""evaluation.py: detections through the library's conversion give pycocotools' own numbers."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet_jax import evaluation

GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 60, "height": 60},
               {"id": 3, "width": 50, "height": 50}],  # image 3: no annotation (a negative)
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [50, 40, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [5, 5, 50, 50], "area": 2500, "iscrowd": 0},
    ],
    "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}, {"id": 11, "name": "c"}],
}


def pycocotools_stats(gt, results, tmp_path):
  gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
  gt_path.write_text(json.dumps({**gt, "info": {}, "licenses": []}))
  dt_path.write_text(json.dumps(results))
  coco = COCO(str(gt_path))
  e = COCOeval(coco, coco.loadRes(str(dt_path)), "bbox")
  e.evaluate()
  e.accumulate()
  e.summarize()
  return e.stats


def test_known_detections_give_pycocotools_numbers(tmp_path):
  # Library-form detections on images resized by 2x (image 1) and 0.5x (image 2); class 0 -> id 5.
  scale = np.array([[2.0, 2.0], [0.5, 0.5]])
  boxes = np.zeros((2, 3, 4))
  boxes[0, 0] = np.array([10, 10, 40, 30]) * 2           # exact
  boxes[0, 1] = np.array([52, 41, 90, 70]) * 2           # close (class b)
  boxes[0, 2] = np.array([0, 0, 20, 20]) * 2             # false positive
  boxes[1, 0] = np.array([8, 6, 55, 52]) * 0.5           # IoU ~0.87
  scores = np.array([[0.9, 0.8, 0.7], [0.6, 0.0, 0.0]])
  classes = np.array([[0, 1, 0], [0, -1, -1]])
  valid = np.array([[True, True, True], [True, False, False]])
  results = evaluation.detections_to_coco(image_ids=[1, 2], boxes=boxes, scores=scores,
                                          classes=classes, valid=valid, category_ids=[5, 9, 11],
                                          scale=scale)
  assert len(results) == 4
  np.testing.assert_allclose(results[0]["bbox"], [10, 10, 30, 20])
  assert results[1]["category_id"] == 9
  ours = evaluation.coco_evaluate(GT, results)
  ref = pycocotools_stats(GT, results, tmp_path)
  np.testing.assert_allclose([ours[n] for n in evaluation.METRIC_NAMES], ref)
  assert 0 < ours["AP"] < 1


def test_perfect_detections_give_ap_one():
  results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
              "score": 1.0} for a in GT["annotations"]]
  metrics = evaluation.coco_evaluate(GT, results)
  assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_what_real_data_does_never_raises():
  assert evaluation.coco_evaluate(GT, [])["AP"] == 0.0  # no detections at all
  empty = {**GT, "annotations": []}
  assert evaluation.coco_evaluate(empty, [])["AP"] == -1.0  # nothing to evaluate
  # Detections only on the unannotated image, in a category without ground truth.
  fp = [{"image_id": 3, "category_id": 11, "bbox": [1, 1, 10, 10], "score": 0.5}]
  assert evaluation.coco_evaluate(GT, fp)["AP"] == 0.0
  assert "n/a" in evaluation.format_table({n: -1.0 for n in evaluation.METRIC_NAMES})


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="image ids absent"):
    evaluation.coco_evaluate(GT, [{"image_id": 99, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1}])
  with pytest.raises(ValueError, match="classes must be in 0..2"):
    evaluation.detections_to_coco(image_ids=[1], boxes=np.zeros((1, 1, 4)), scores=np.ones((1, 1)),
                                  classes=np.array([[3]]), valid=np.ones((1, 1), bool),
                                  category_ids=[5, 9, 11])
  with pytest.raises(ValueError, match="'annotations'"):
    evaluation.coco_evaluate({"images": []}, [])


# ----------------------------------------------------------------------------------------------
# maxDets beyond 100 and AP per category, against pycocotools


def dense_scene(seed=0, *, num_images=12, category_ids=(3, 17, 42, 90), max_objects=60,
                detections_per_image=400):
  """Ground truth with sparse category ids (category 90 never annotated) and realistic detections:
  jittered copies of the boxes (some with the wrong class) and random false positives, many more
  than 100 per image, every size range present."""
  rng = np.random.default_rng(seed)
  images, annotations, results = [], [], []
  for image_id in range(1, num_images + 1):
    images.append({"id": image_id, "width": 640, "height": 480})
    boxes = []
    for _ in range(rng.integers(0, max_objects)):
      w, h = np.exp(rng.uniform(np.log(6), np.log(200), 2))
      x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
      category = int(rng.choice(category_ids[:-1]))
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                          "bbox": [x, y, w, h], "area": w * h,
                          "iscrowd": int(rng.uniform() < 0.03)})
      boxes.append((x, y, w, h, category))
    for _ in range(detections_per_image):
      if boxes and rng.uniform() < 0.6:
        x, y, w, h, category = boxes[rng.integers(len(boxes))]
        x, y = x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h)
        w, h = w * np.exp(rng.normal(0, 0.15)), h * np.exp(rng.normal(0, 0.15))
        if rng.uniform() < 0.1:
          category = int(rng.choice(category_ids))
        score = rng.beta(4, 2)
      else:
        w, h = np.exp(rng.uniform(np.log(6), np.log(200), 2))
        x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
        category, score = int(rng.choice(category_ids)), rng.beta(2, 4)
      results.append({"image_id": image_id, "category_id": category,
                      "bbox": [float(x), float(y), float(w), float(h)], "score": float(score)})
  categories = [{"id": c, "name": f"class_{c}"} for c in category_ids]
  return {"images": images, "annotations": annotations, "categories": categories}, results


@pytest.fixture(scope="module")
def dense():
  return dense_scene()


def _patched_summarize(cocoeval):
  """pycocotools' own summarize with its hard-coded maxDets replaced by the last one (the literal
  100 of AP and maxDets[2] of AP50 ... ARl; cocoapi#558), run on `cocoeval`."""
  import inspect
  import textwrap
  from pycocotools import cocoeval as cocoeval_module
  source = textwrap.dedent(inspect.getsource(COCOeval.summarize))
  patched = (source.replace("maxDets=100 )", "maxDets=None )")
             .replace("mDet == maxDets]", "mDet == (maxDets or p.maxDets[-1])]")
             .replace("maxDets, mean_s))", "maxDets or p.maxDets[-1], mean_s))")
             .replace("self.params.maxDets[2]", "self.params.maxDets[-1]"))
  assert patched.count("maxDets[-1]") == 11, "pycocotools' summarize is not the expected source"
  namespace = dict(vars(cocoeval_module))
  exec(patched, namespace)  # pylint: disable=exec-used
  namespace["summarize"](cocoeval)
  return cocoeval.stats


def _pycocotools(gt, results, max_dets, tmp_path):
  gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
  gt_path.write_text(json.dumps({**gt, "info": {}, "licenses": []}))
  dt_path.write_text(json.dumps(results))
  coco = COCO(str(gt_path))
  e = COCOeval(coco, coco.loadRes(str(dt_path)), "bbox")
  e.params.maxDets = list(max_dets)
  e.evaluate()
  e.accumulate()
  return e


def test_default_max_dets_give_pycocotools_stats_on_a_dense_scene(dense, tmp_path):
  gt, results = dense
  e = _pycocotools(gt, results, (1, 10, 100), tmp_path)
  e.summarize()
  ours = evaluation.evaluate_detections(gt, results)
  assert tuple(ours.metrics) == evaluation.METRIC_NAMES
  np.testing.assert_allclose([ours.metrics[n] for n in evaluation.METRIC_NAMES], e.stats,
                             rtol=0, atol=1e-12)
  assert ours.max_dets == (1, 10, 100) and ours.backend == "pycocotools"
  assert 0.05 < ours.metrics["AP"] < 0.95


@pytest.mark.parametrize("max_dets", [(1, 10, 100, 300), (5, 50), (1, 10, 1000)])
def test_other_max_dets_give_patched_pycocotools(dense, tmp_path, max_dets):
  gt, results = dense
  e = _pycocotools(gt, results, max_dets, tmp_path)
  stats = _patched_summarize(e)
  ours = evaluation.coco_evaluate(gt, results, max_dets=max_dets)
  names = evaluation.metric_names(max_dets)
  assert tuple(ours) == names
  last = max_dets[-1]
  at = "" if last == 100 else f"@{last}"
  assert names[:6] == tuple(f"{n}{at}" for n in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
  assert names[-3:] == (f"ARs{at}", f"ARm{at}", f"ARl{at}")
  # stats: AP..APl at the last maxDets, AR at maxDets[0], maxDets[1], maxDets[-1], ARs..ARl.
  reference = {**dict(zip(names[:6], stats[:6])), f"AR{max_dets[0]}": stats[6],
               f"AR{max_dets[1]}": stats[7], f"AR{last}": stats[8],
               **dict(zip(names[-3:], stats[9:]))}
  for name, value in reference.items():
    assert ours[name] == pytest.approx(value, abs=1e-12), name
  # The maxDets in between: pycocotools' unpatched AR at them (e.g. AR100 of (1, 10, 100, 300)).
  for m in max_dets[2:-1]:
    plain = _pycocotools(gt, results, (1, 10, m), tmp_path)
    plain.summarize()
    assert ours[f"AR{m}"] == pytest.approx(plain.stats[8], abs=1e-12)
  if last > 100:  # more detections evaluated: recall grows, as the dense scene was built to show
    assert ours[f"AR{last}"] > evaluation.coco_evaluate(gt, results)["AR100"]


def test_ap_per_category_is_pycocotools_precision_averaged_per_category(dense, tmp_path):
  gt, results = dense
  for max_dets in [(1, 10, 100), (1, 10, 100, 300)]:
    e = _pycocotools(gt, results, max_dets, tmp_path)
    ours = evaluation.evaluate_detections(gt, results, max_dets=max_dets)
    assert [c["id"] for c in ours.per_category] == [3, 17, 42, 90] == e.params.catIds
    precision, recall = e.eval["precision"], e.eval["recall"]
    for k, c in enumerate(ours.per_category):
      assert c["name"] == f"class_{c['id']}"
      assert c["num_gt"] == sum(1 for a in gt["annotations"]
                                if a["category_id"] == c["id"] and not a["iscrowd"])
      p = precision[:, :, k, 0, -1]
      if c["id"] == 90:  # no ground truth: undefined, as pycocotools leaves it out of the mean
        assert c["num_gt"] == 0 and c["AP"] == -1.0 and np.all(p == -1)
        continue
      assert c["AP"] == pytest.approx(np.mean(p[p > -1]), abs=1e-12)
      assert c["AP50"] == pytest.approx(np.mean(precision[0, :, k, 0, -1]), abs=1e-12)
      assert c["AP75"] == pytest.approx(np.mean(precision[5, :, k, 0, -1]), abs=1e-12)
      assert c[f"AR{max_dets[-1]}"] == pytest.approx(np.mean(recall[:, k, 0, -1]), abs=1e-12)
    # Every defined category has all T x R entries, so the mean AP is the mean of theirs.
    defined = [c["AP"] for c in ours.per_category if c["AP"] >= 0]
    assert ours.metrics[evaluation.metric_names(max_dets)[0]] == pytest.approx(np.mean(defined))


def test_report_and_json_say_which_max_dets(dense, tmp_path):
  gt, results = dense
  result = evaluation.evaluate_detections(gt, results, max_dets=(1, 10, 100, 300))
  report = evaluation.format_report(result)
  assert "AP@300" in report and "maxDets=300" in report and "class_42" in report
  assert "n/a" in report  # category 90: no ground truth
  many = dataclasses_replace(result, per_category=result.per_category * 6)
  assert "class_42" not in evaluation.format_report(many)
  evaluation.write_metrics(str(tmp_path / "eval_1.json"), result.metrics, **result.to_json())
  written = json.loads((tmp_path / "eval_1.json").read_text())
  assert written["max_dets"] == [1, 10, 100, 300] and "AR300" in written["metrics"]
  assert [c["id"] for c in written["per_category"]] == [3, 17, 42, 90]
  empty = evaluation.evaluate_detections(gt, [], max_dets=(1, 10, 100, 300))
  assert set(empty.metrics) == set(evaluation.metric_names((1, 10, 100, 300)))
  assert [c["AP"] for c in empty.per_category] == [0.0, 0.0, 0.0, -1.0]


def dataclasses_replace(obj, **changes):
  import dataclasses
  return dataclasses.replace(obj, **changes)


@pytest.mark.parametrize("bad", [(), (10, 1), (0, 10), (1, 1, 100), (1.5, 10)])
def test_bad_max_dets_are_named(bad):
  with pytest.raises(ValueError, match="max_dets must be strictly increasing"):
    evaluation.coco_evaluate(GT, [], max_dets=bad)


# ----------------------------------------------------------------------------------------------
# The faster-coco-eval backend


@pytest.mark.parametrize("max_dets", [(1, 10, 100), (1, 10, 100, 300)])
def test_faster_coco_eval_gives_pycocotools_numbers(dense, max_dets):
  gt, results = dense
  ref = evaluation.evaluate_detections(gt, results, max_dets=max_dets)
  fast = evaluation.evaluate_detections(gt, results, max_dets=max_dets, backend="faster_coco_eval")
  assert fast.backend == "faster_coco_eval" and list(fast.metrics) == list(ref.metrics)
  np.testing.assert_allclose(list(fast.metrics.values()), list(ref.metrics.values()), rtol=0,
                             atol=1e-4)
  for a, b in zip(fast.per_category, ref.per_category):
    assert a.keys() == b.keys() and a["id"] == b["id"]
    for key in ("AP", "AP50", "AP75", f"AR{max_dets[-1]}"):
      assert a[key] == pytest.approx(b[key], abs=1e-4)


def test_faster_coco_eval_on_a_trained_models_detections(tmp_path_factory):
  """All 12 numbers on the detections of the tiny synthetic model that the subprocess tests train
  (tests/helpers/runs.py: one run per test session, shared)."""
  import os
  from retinanet_jax import config as config_lib
  from retinanet_jax import data as data_lib
  from tests.helpers import runs
  workdir = runs.reference_run(tmp_path_factory)
  with open(os.path.join(workdir, "detections_20.json")) as f:
    detections = json.load(f)
  ground_truth = data_lib.coco_ground_truth(config_lib.load_run_config(workdir).data)
  assert len(detections) > 100
  ref = evaluation.coco_evaluate(ground_truth, detections)
  fast = evaluation.coco_evaluate(ground_truth, detections, backend="faster_coco_eval")
  print({name: (ref[name], fast[name]) for name in evaluation.METRIC_NAMES})
  assert ref["AR100"] > 0
  for name in evaluation.METRIC_NAMES:
    assert fast[name] == pytest.approx(ref[name], abs=1e-4), name


def test_faster_coco_eval_missing_names_the_pip_command(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails as if not installed
  results = [{"image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 20], "score": 1.0}]
  with pytest.raises(ImportError, match=r"pip install 'faster-coco-eval==1.8.0'"):
    evaluation.coco_evaluate(GT, results, backend="faster_coco_eval")
  with pytest.raises(ValueError, match="backend 'cocoapi' is not one of"):
    evaluation.coco_evaluate(GT, results, backend="cocoapi")
