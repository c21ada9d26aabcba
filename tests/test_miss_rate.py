"""evaluation/miss_rate.py: hand-computed cases of the Caltech/CityPersons protocol, and an independent
NumPy implementation written here from the protocol's definition (module docstring there)."""

import math

import numpy as np
import pytest

from retinanet_jax.metrics import miss_rate

FLOOR = 1e-10
PEDESTRIAN = [{"id": 1, "name": "pedestrian"}]


def scene(boxes_per_image, *, num_images=None, categories=PEDESTRIAN):
  """A COCO dict: boxes_per_image[i] = [(x, y, w, h, extra fields), ...] on image i + 1."""
  num_images = num_images or len(boxes_per_image)
  images = [{"id": i + 1, "width": 1000, "height": 800} for i in range(num_images)]
  annotations = []
  for i, boxes in enumerate(boxes_per_image):
    for x, y, w, h, extra in boxes:
      annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                          "bbox": [x, y, w, h], "iscrowd": 0, "vis_ratio": 1.0, **extra})
  return {"images": images, "annotations": annotations, "categories": categories}


def det(image_id, box, score, category_id=1):
  return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score}


PERSON = (100, 100, 40, 100, {})  # 100 px tall, fully visible: in Reasonable and All


def test_perfect_detector_has_zero_miss_rate():
  gt = scene([[PERSON, (300, 100, 30, 80, {})], [(500, 200, 50, 120, {"vis_ratio": 0.4})]])
  dets = [det(a["image_id"], a["bbox"], 0.9) for a in gt["annotations"]]
  result = miss_rate.evaluate_miss_rate(gt, dets)
  assert result.metrics["MR_Reasonable"] == pytest.approx(FLOOR)  # 0 %, clipped as dbEval.m
  assert result.metrics["MR_All"] == pytest.approx(FLOOR)
  assert result.metrics["MR_Heavy"] == pytest.approx(FLOOR)  # the 0.4-visible one
  assert result.metrics["MR_Small"] == -1.0  # no pedestrian 50-75 px tall: undefined
  assert [s["num_gt"] for s in result.per_subset] == [2, 0, 1, 3]
  assert "0.00" in miss_rate.format_report(result) and "n/a" in miss_rate.format_report(result)


def test_one_miss_out_of_four():
  gt = scene([[PERSON, (300, 100, 40, 100, {})], [PERSON, (600, 100, 40, 100, {})]])
  dets = [det(a["image_id"], a["bbox"], 0.5 + 0.1 * a["id"]) for a in gt["annotations"][:3]]
  assert miss_rate.evaluate_miss_rate(gt, dets).metrics["MR_Reasonable"] == pytest.approx(0.25)


def test_false_positives_only():
  gt = scene([[PERSON], []])
  dets = [det(1, (600, 400, 40, 100), 0.9), det(2, (10, 10, 50, 120), 0.8)]
  result = miss_rate.evaluate_miss_rate(gt, dets)
  assert result.metrics["MR_Reasonable"] == 1.0
  np.testing.assert_array_equal(result.per_subset[0]["miss_rates"], np.ones(9))


def test_fppi_points_read_the_longest_prefix_at_or_below_them():
  # 10 images, 2 pedestrians; by score: hit, false positive (FPPI 0.1), hit. Up to FPPI 0.0562
  # the recall is 1/2; at 0.1 (a point exactly) and above it is 1 (miss 0, clipped to 1e-10).
  gt = scene([[PERSON], [PERSON]], num_images=10)
  dets = [det(1, PERSON[:4], 0.9), det(5, (10, 10, 40, 100), 0.8), det(2, PERSON[:4], 0.7)]
  result = miss_rate.evaluate_miss_rate(gt, dets)
  expected = math.exp((4 * math.log(0.5) + 5 * math.log(FLOOR)) / 9)
  assert result.metrics["MR_Reasonable"] == pytest.approx(expected, rel=1e-12)
  np.testing.assert_allclose(result.per_subset[0]["miss_rates"], [0.5] * 4 + [0.0] * 5)


def test_ignore_regions_absorb_detections_and_are_never_missed():
  region = (0, 0, 400, 300, {"ignore": 1})  # e.g. a crowd: ignored whatever its size
  gt = scene([[PERSON, region, (600, 100, 40, 100, {"ignore": 1})]])
  # In the region with IoU < 0.5 but intersection / detection area = 1: removed, not a false
  # positive, even scored above the hit; the 'ignore' pedestrian at 600 is not a miss.
  dets = [det(1, (10, 10, 40, 90), 0.95), det(1, (250, 200, 30, 60), 0.9), det(1, PERSON[:4], 0.8)]
  result = miss_rate.evaluate_miss_rate(gt, dets)
  assert result.per_subset[0]["num_gt"] == 1 and result.per_subset[0]["num_ignored"] == 2
  assert result.metrics["MR_Reasonable"] == pytest.approx(FLOOR)
  # The same detections without the region: two false positives at FPPI 1 and 2 before the hit.
  plain = scene([[PERSON]])
  assert miss_rate.evaluate_miss_rate(plain, dets).metrics["MR_Reasonable"] == 1.0
  # iscrowd is an ignore flag too.
  crowd = scene([[PERSON, (0, 0, 400, 300, {"iscrowd": 1})]])
  assert miss_rate.evaluate_miss_rate(crowd, dets).metrics["MR_Reasonable"] == pytest.approx(FLOOR)


def test_boxes_below_the_height_range():
  short = (300, 100, 16, 40, {})  # 40 px: below Reasonable's 50, inside All's 20
  gt = scene([[PERSON, short]])
  hit = det(1, PERSON[:4], 0.9)
  result = miss_rate.evaluate_miss_rate(gt, [hit])
  assert result.metrics["MR_Reasonable"] == pytest.approx(FLOOR)  # the short one is ignored there
  assert result.metrics["MR_All"] == pytest.approx(0.5)           # and missed here
  # A 30 px false positive is below 50 / 1.25 = 40: not counted in Reasonable, counted in All.
  tiny_fp = det(1, (700, 500, 12, 30), 0.95)
  result = miss_rate.evaluate_miss_rate(gt, [hit, tiny_fp])
  assert result.metrics["MR_Reasonable"] == pytest.approx(FLOOR)
  # In All the FP comes first: below FPPI 1 nothing is found; at FPPI 1 (1 FP, 1 image) the hit
  # is in, recall 1/2 (the short one is missed).
  assert result.metrics["MR_All"] == pytest.approx(0.5 ** (1 / 9))
  # A 42 px detection on the 40 px pedestrian: inside the expanded range, matches an ignored box in
  # Reasonable (removed), a hit in All.
  on_short = det(1, (300, 99, 16, 42), 0.95)
  result = miss_rate.evaluate_miss_rate(gt, [hit, on_short])
  assert result.metrics["MR_Reasonable"] == pytest.approx(FLOOR)
  assert result.metrics["MR_All"] == pytest.approx(FLOOR)


def test_visibility_from_a_visible_box_and_the_heavy_subset():
  gt = scene([[(100, 100, 40, 100, {"vis_ratio": None, "vis_bbox": [100, 100, 40, 30]}),
               (300, 100, 40, 100, {"vis_ratio": None, "visible_bbox": [300, 100, 40, 80]})]])
  assert miss_rate.visibility(gt["annotations"][0]) == pytest.approx(0.3)
  result = miss_rate.evaluate_miss_rate(gt, [])
  assert [s["num_gt"] for s in result.per_subset] == [1, 0, 1, 2]  # 0.8 / 0.3 visible
  with pytest.raises(ValueError, match="annotation id 7: vis_ratio must be a number in"):
    miss_rate.visibility({"id": 7, "vis_ratio": 1.5, "bbox": [0, 0, 1, 1]})


def test_category_choice_and_bad_input():
  two = [{"id": 1, "name": "rider"}, {"id": 2, "name": "person"}]
  assert miss_rate.evaluated_category(two)["id"] == 2
  assert miss_rate.evaluated_category(two, "rider")["id"] == 1
  with pytest.raises(ValueError, match="which category is the pedestrian"):
    miss_rate.evaluated_category([{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}])
  with pytest.raises(ValueError, match="no category named 'cyclist'"):
    miss_rate.evaluated_category(two, "cyclist")
  with pytest.raises(ValueError, match="image ids absent"):
    miss_rate.evaluate_miss_rate(scene([[PERSON]]), [det(9, PERSON[:4], 0.5)])


# ----------------------------------------------------------------------------------------------
# An independent implementation, from the protocol's definition


def reference_mr(gt, dets, height_range, visibility_range):
  """Log-average miss rate written plainly from the definition: per image, detections by score;
  each takes the best free non-ignored box at IoU >= 0.5, else is removed if some ignored box
  covers >= 0.5 of it, else is a false positive; then the ROC over a score threshold."""
  h_lo, h_hi = height_range
  v_lo, v_hi = visibility_range
  per_image = {im["id"]: ([], []) for im in gt["images"]}
  for a in gt["annotations"]:
    vis = a["vis_ratio"]
    x, y, w, h = a["bbox"]
    ignored = bool(a.get("ignore")) or not (h_lo <= h <= h_hi and v_lo <= vis <= v_hi)
    per_image[a["image_id"]][0].append(((x, y, x + w, y + h), ignored))
  for d in dets:
    x, y, w, h = d["bbox"]
    if h_lo / 1.25 <= h < h_hi * 1.25:
      per_image[d["image_id"]][1].append(((x, y, x + w, y + h), d["score"]))

  def inter(a, b):
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    return iw * ih if iw > 0 and ih > 0 else 0.0

  area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
  counted = []  # (score, is_hit)
  positives = 0
  for truths, found in per_image.values():
    positives += sum(1 for _, ignored in truths if not ignored)
    free = [not ignored for _, ignored in truths]
    for box, score in sorted(found, key=lambda f: -f[1]):
      best, best_iou = None, 0.5
      for j, (t, ignored) in enumerate(truths):
        if ignored or not free[j]:
          continue
        iou = inter(box, t) / (area(box) + area(t) - inter(box, t))
        if iou >= best_iou:
          best, best_iou = j, iou
      if best is not None:
        free[best] = False
        counted.append((score, True))
      elif any(ignored and inter(box, t) / area(box) >= 0.5 for t, ignored in truths):
        continue
      else:
        counted.append((score, False))
  if positives == 0:
    return -1.0
  counted.sort(key=lambda c: -c[0])
  logs = []
  for point in [10 ** (-2 + k / 4) for k in range(9)]:
    recall, hits, misses = 0.0, 0, 0
    for _, hit in counted:
      hits, misses = hits + hit, misses + (not hit)
      if misses / len(per_image) <= point:
        recall = hits / positives
    logs.append(math.log(max(1.0 - recall, 1e-10)))
  return math.exp(sum(logs) / len(logs))


def random_scene(seed, num_images=120):
  rng = np.random.default_rng(seed)
  boxes, dets = [], []
  for i in range(num_images):
    image = []
    for _ in range(rng.integers(0, 6)):
      h = float(np.exp(rng.uniform(np.log(15), np.log(250))))
      w = 0.41 * h
      x, y = float(rng.uniform(0, 1000 - w)), float(rng.uniform(0, 800 - h))
      extra = {"vis_ratio": float(rng.choice([1.0, rng.uniform(0, 1)])),
               "ignore": int(rng.uniform() < 0.08)}
      image.append((x, y, w, h, extra))
      if rng.uniform() < 0.75:  # found, a bit off
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        dets.append(det(i + 1, (x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]),
                        float(rng.beta(5, 2))))
    for _ in range(rng.poisson(1.5)):  # false positives of every size
      h = float(np.exp(rng.uniform(np.log(15), np.log(250))))
      dets.append(det(i + 1, (float(rng.uniform(0, 900)), float(rng.uniform(0, 600)), 0.41 * h, h),
                      float(rng.beta(2, 5))))
    boxes.append(image)
  return scene(boxes), dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_an_independent_implementation_on_random_scenes(seed):
  gt, dets = random_scene(seed)
  result = miss_rate.evaluate_miss_rate(gt, dets)
  for subset in miss_rate.SUBSETS:
    expected = reference_mr(gt, dets, subset.height_range, subset.visibility_range)
    assert result.metrics[miss_rate.metric_name(subset)] == pytest.approx(expected, rel=1e-12), (
        subset.name)
    assert 0.05 < expected < 0.95, subset.name  # a scene where every subset has hits and misses


# ----------------------------------------------------------------------------------------------
# Through the evaluator (scripts/evaluate.py's path), on the tiny trained model


def test_eval_metric_miss_rate_through_a_saved_model(tmp_path_factory, tmp_path):
  """`eval.metric='miss_rate'` evaluates a saved model (tests/helpers/runs.py's shared tiny run,
  synthetic data without visibility fields: everything counts as visible) and writes its JSON;
  the numbers are `evaluate_miss_rate` of the run's own detections (the same model, the same
  images)."""
  import dataclasses
  import json
  import os
  from retinanet_jax import config as config_lib
  from retinanet_jax import data as data_lib
  from retinanet_jax.evaluation import evaluator
  from tests.helpers import runs
  workdir = runs.reference_run(tmp_path_factory)
  config = config_lib.load_run_config(workdir)
  config = dataclasses.replace(config, eval=dataclasses.replace(
      config.eval, metric="miss_rate", miss_rate_category="green_circle"))
  result = evaluator.evaluate_saved(workdir, config=config, output_dir=str(tmp_path))
  with open(os.path.join(workdir, "detections_20.json")) as f:
    detections = json.load(f)
  expected = miss_rate.evaluate_miss_rate(data_lib.coco_ground_truth(config.data), detections,
                                          category="green_circle")
  assert result.metrics == pytest.approx(expected.metrics, abs=1e-9)
  assert set(result.metrics) == {"MR_Reasonable", "MR_Small", "MR_Heavy", "MR_All"}
  assert 0 < result.metrics["MR_All"] <= 1  # objects of 12-51 px: the All subset has pedestrians
  written = json.loads((tmp_path / "eval_20.json").read_text())
  assert written["metric"] == "miss_rate" and written["category"]["name"] == "green_circle"
  assert written["metrics"] == pytest.approx(result.metrics)
  bad = dataclasses.replace(config, eval=dataclasses.replace(config.eval,
                                                             miss_rate_category="pedestrian"))
  with pytest.raises(ValueError, match="no category named 'pedestrian'"):
    evaluator.evaluate_saved(workdir, config=bad)
