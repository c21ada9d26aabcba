"""The eval suite: COCO evaluation with the faster-coco-eval engine against pycocotools.

Both through `retinanet_jax.evaluation.evaluate_detections` on the same detections (the "ours"
column is `backend='faster_coco_eval'`, the "peer" column `backend='pycocotools'`): COCOeval's
evaluate + accumulate and the summary, loading included. Inputs are made here, seeded: boxes of
COCO's size spread with jittered copies as true positives and random false positives.
"""

from __future__ import annotations

from benchmarks.timing import Row, Session, side_by_side


def synthetic_detections(*, num_images: int, num_categories: int, objects_per_image: int,
                         detections_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
  """(COCO ground truth, COCO results) of `num_images` 640x480 images."""
  import numpy as np
  rng = np.random.default_rng(seed)
  images, annotations, results = [], [], []
  for image_id in range(1, num_images + 1):
    images.append({"id": image_id, "width": 640, "height": 480})
    boxes = []
    for _ in range(rng.poisson(objects_per_image)):
      w, h = np.exp(rng.uniform(np.log(8), np.log(300), 2))
      x, y = rng.uniform(0, 640 - min(w, 639)), rng.uniform(0, 480 - min(h, 479))
      category = int(rng.integers(1, num_categories + 1))
      annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": category, "bbox": [x, y, w, h], "area": w * h,
                          "iscrowd": 0})
      boxes.append((x, y, w, h, category))
    for _ in range(detections_per_image):
      if boxes and rng.uniform() < 0.5:
        x, y, w, h, category = boxes[rng.integers(len(boxes))]
        x, y = x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h)
        w, h = w * np.exp(rng.normal(0, 0.15)), h * np.exp(rng.normal(0, 0.15))
        score = rng.beta(4, 2)
      else:
        w, h = np.exp(rng.uniform(np.log(8), np.log(300), 2))
        x, y = rng.uniform(0, 640 - min(w, 639)), rng.uniform(0, 480 - min(h, 479))
        category, score = int(rng.integers(1, num_categories + 1)), rng.beta(2, 4)
      results.append({"image_id": image_id, "category_id": category,
                      "bbox": [float(x), float(y), float(w), float(h)], "score": float(score)})
  categories = [{"id": c, "name": f"c{c}"} for c in range(1, num_categories + 1)]
  return {"images": images, "annotations": annotations, "categories": categories}, results


def bench_coco_eval(session: Session) -> list[Row]:
  from retinanet_jax import evaluation

  quick, repeats = session.options.quick, session.options.repeats
  cases = [
      ("COCO-like: 80 classes, ~7 objects and 100 detections per image", 20 if quick else 500, 80,
       7, 100, evaluation.DEFAULT_MAX_DETS),
      ("dense (SKU-110K-like): 1 class, ~150 objects and 300 detections per image, maxDets "
       "(1, 10, 100, 300)", 5 if quick else 20, 1, 150, 300, (1, 10, 100, 300)),
  ]
  rows = []
  for name, images, classes, objects, detections, max_dets in cases:
    gt, results = synthetic_detections(num_images=images, num_categories=classes,
                                       objects_per_image=objects, detections_per_image=detections)
    run = lambda backend: evaluation.evaluate_detections(gt, results, max_dets=max_dets,
                                                         backend=backend)
    fast, reference = run("faster_coco_eval").metrics, run("pycocotools").metrics
    difference = max(abs(fast[k] - reference[k]) for k in reference)
    ours, peer = side_by_side(lambda: run("faster_coco_eval"), lambda: run("pycocotools"), repeats,
                              warmup=False)
    rows.append(Row("eval", f"COCO evaluation {images} images, {name}: faster-coco-eval (ours "
                    f"column) vs pycocotools (peer)", ours, peer, 0.0,
                    f"{len(results)} detections; largest metric difference {difference:.1e}"))
  return rows
