"""evaluation/multi_domain.py (scripts/evaluate.py --datasets / --coco_o_root): a small tree in
COCO-O's layout built from the synthetic validation images (transformed copies); each domain's AP
equals a separate single-domain evaluation of a hand-prepared copy, and a converted checkpoint whose
label map holds COCO category ids gives the same numbers on the tree relabelled with those ids."""

import dataclasses
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from retinanet_jax import checkpoints
from retinanet_jax import config as config_lib
from retinanet_jax import data as data_lib
from retinanet_jax.data import coco_format
from retinanet_jax.data.labels import LabelMap
from retinanet_jax.evaluation import evaluator, multi_domain
from tests.helpers import runs

COCO_IDS = (1, 3, 18, 44, 62, 90)  # person, car, dog, bottle, chair, toothbrush: sparse, as COCO's
TRANSFORMS = {
    "original": lambda image, boxes, w: (image, boxes),
    "negative": lambda image, boxes, w: (255 - image, boxes),
    "mirror": lambda image, boxes, w: (image[:, ::-1], [[w - x - bw, y, bw, bh]
                                                        for x, y, bw, bh in boxes]),
}


def write_tree(root, ground_truth, pixels, *, category_ids=None):
  """`root/<domain>/val2017/<id>.jpg` and `root/<domain>/annotations/instances_val2017.json` for
  every transform (a COCO-O-like tree); category ids remapped by `category_ids` when given."""
  remap = dict(zip(range(1, 7), category_ids)) if category_ids else {}
  for domain, transform in TRANSFORMS.items():
    os.makedirs(root / domain / "val2017")
    os.makedirs(root / domain / "annotations")
    gt = json.loads(json.dumps(ground_truth))
    for im in gt["images"]:
      im["file_name"] = f"{im['id']:012d}.jpg"
      anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
      image, boxes = transform(pixels[im["id"]], [a["bbox"] for a in anns], im["width"])
      for a, box in zip(anns, boxes):
        a["bbox"] = [float(v) for v in box]
      buffer = io.BytesIO()
      Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=95)
      (root / domain / "val2017" / im["file_name"]).write_bytes(buffer.getvalue())
    for a in gt["annotations"]:
      a["category_id"] = remap.get(a["category_id"], a["category_id"])
    for c in gt["categories"]:
      c["id"] = remap.get(c["id"], c["id"])
    (root / domain / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """(trained run's workdir, its config, tree root, tree root with COCO ids, tmp folder)."""
  workdir = runs.reference_run(tmp_path_factory)
  config = config_lib.load_run_config(workdir)
  ground_truth = data_lib.coco_ground_truth(config.data)
  pixels = {int(e["image_id"]): e["image"]
            for e in data_lib.load_examples(config.data, "validation").as_numpy_iterator()}
  tmp = tmp_path_factory.mktemp("multi_domain")
  write_tree(tmp / "coco_o", ground_truth, pixels)
  write_tree(tmp / "coco_o_coco_ids", ground_truth, pixels, category_ids=COCO_IDS)
  return workdir, config, tmp / "coco_o", tmp / "coco_o_coco_ids", tmp


def single_domain(workdir, config, domain, data_dir, name):
  """The domain prepared by hand (as scripts/prepare_dataset.py would) and evaluated alone."""
  source = coco_format.SplitSource(coco_format.load_annotations(domain.annotations_file),
                                   coco_format.image_reader(domain.images_dir))
  coco_format.build_tfds_dataset(name, {"validation": source}, data_dir=str(data_dir))
  data = dataclasses.replace(config.data, name=name, data_dir=str(data_dir),
                             eval_split="validation")
  return evaluator.evaluate_saved(workdir, config=dataclasses.replace(config, data=data))


def test_each_domain_equals_its_single_domain_evaluation(tree):
  workdir, config, root, _, tmp = tree
  domains = multi_domain.domains_under(str(root))
  assert [d.name for d in domains] == ["mirror", "negative", "original"]
  result = multi_domain.evaluate_saved_on_domains(
      workdir, domains, config=config, reference="config", data_dir=str(tmp / "cache"),
      output_dir=str(tmp / "out"))
  for domain, got in zip(domains, result.domains):
    alone = single_domain(workdir, config, domain, tmp / "single", f"single_{domain.name}")
    assert got.name == domain.name and got.num_images == 16
    assert got.result.metrics == pytest.approx(alone.metrics, abs=1e-12), domain.name
    assert got.result.per_category == alone.per_category
  # The reference is the run's own validation split: the numbers of its last evaluation.
  assert result.reference.result.metrics == pytest.approx(runs.eval_metrics(workdir, 20), abs=1e-9)
  aps = [d.result.metrics["AP"] for d in result.domains]
  assert min(aps) > 0 and len(set(aps)) == 3  # the transforms change the numbers
  assert result.mean["AP"] == pytest.approx(np.mean(aps))
  assert result.relative_drop["AP"] == pytest.approx(
      1 - np.mean(aps) / result.reference.result.metrics["AP"])
  report = multi_domain.format_report(result)
  assert "mean of 3" in report and "(reference)" in report and "relative drop" in report
  written = json.loads((tmp / "out" / "multi_domain_20.json").read_text())
  assert [d["name"] for d in written["domains"]] == ["mirror", "negative", "original"]
  assert written["mean"]["AP"] == pytest.approx(result.mean["AP"])
  assert written["domains"][0]["per_category"][0]["name"] == "red_square"
  # Run again: the cached copies are reused, not rebuilt.
  names = [multi_domain.dataset_name(d) for d in domains]
  stamps = [os.path.getmtime(tmp / "cache" / n) for n in names]
  assert [multi_domain.cached_dataset(d, data_dir=str(tmp / "cache")) for d in domains] == names
  assert [os.path.getmtime(tmp / "cache" / n) for n in names] == stamps


def test_a_converted_coco_checkpoint_reports_in_coco_category_ids(tree):
  """The trained model saved as converted weights whose label map is COCO's ids (what
  scripts/convert_weights.py writes for torchvision's COCO models), on the tree relabelled with
  those ids: the same numbers as the trained model on the original ids."""
  workdir, config, root, coco_root, tmp = tree
  state, description = checkpoints.read_model_state(os.path.join(workdir, "checkpoints", "20"))
  names = tuple(f"coco_{i}" for i in COCO_IDS)
  converted = dataclasses.replace(description, label_map=LabelMap(COCO_IDS, names), geometry=None,
                                  source={"format": "converted for a test"})
  checkpoints.save_model(str(tmp / "converted"), state, converted)
  loaded = checkpoints.load_model(str(tmp / "converted"))
  assert loaded.step is None and loaded.description.label_map.category_ids == COCO_IDS
  domains = multi_domain.domains_under(str(coco_root))[:2]
  result = multi_domain.evaluate_saved_on_domains(
      str(tmp / "converted"), domains, config=config, data_dir=str(tmp / "cache"),
      output_dir=str(tmp / "out"))
  plain = multi_domain.evaluate_saved_on_domains(
      workdir, multi_domain.domains_under(str(root))[:2], config=config,
      data_dir=str(tmp / "cache"))
  for got, expected in zip(result.domains, plain.domains):
    assert got.result.metrics == pytest.approx(expected.result.metrics, abs=1e-12)
    assert [c["id"] for c in got.result.per_category] == list(COCO_IDS)
    assert [c["AP"] for c in got.result.per_category] == [c["AP"] for c in
                                                         expected.result.per_category]
  assert result.reference is None and result.relative_drop is None
  assert os.path.isfile(tmp / "out" / "multi_domain_converted.json")


def test_folders_without_the_layout_are_named(tmp_path):
  (tmp_path / "a" / "val2017").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"a is not a COCO-format folder: missing .*"
                     r"annotations/instances_val2017\.json"):
    multi_domain.domain_from_folder(str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match="no COCO-format folder"):
    multi_domain.domains_under(str(tmp_path))
