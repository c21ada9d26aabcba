"""One model evaluated on several COCO-format datasets in one run: COCO-O's domains, or any others.

    domains = domains_under("/data/COCO-O")     # sketch, cartoon, painting, weather, handmake, tattoo
    result = evaluate_saved_on_domains("weights/tv_v1", domains, config=config, reference="config")
    print(format_report(result))

Each domain is a folder in COCO's own layout, `<domain>/val2017/` (the images) and
`<domain>/annotations/instances_val2017.json`, as COCO-O ships them (and as COCO val 2017 itself is
laid out). The first time a folder is seen it is converted into a TFDS dataset in `data_dir`
(`coco_format.build_tfds_dataset`: every image and annotation validated, problems counted and
reported as by scripts/prepare_dataset.py), named `multidomain_<folder>_<hash>` where the hash covers
the folder's absolute path and the annotation file's bytes: the copy is reused while the annotations
are unchanged, and a changed file gets a new copy. Each domain is then evaluated exactly as
scripts/evaluate.py evaluates a prepared dataset: the config's geometry and evaluation settings, the
dataset's stored ground truth (original category ids), and the model's label map, so a converted
torchvision or detectron2 COCO model reports in COCO category ids, which COCO-O's annotations use.

Why cached TFDS copies rather than reading the JPEGs directly: every domain then goes through the one
evaluation input pipeline (decoding, resize, per-host sharding and padding) that all other
evaluations use, so a domain's AP is the AP that a hand-prepared copy gives, on one host or many,
and bad files are reported the same way; the price is one pass over the images the first time
(COCO-O: 6,782 images).

The summary: each domain's COCO metrics (and AP per category), their mean over the domains, and, with
a reference evaluation (`reference='config'`: the config's own evaluation data, e.g. TFDS
coco/2017 validation; or another folder such as COCO val 2017), its metrics and the relative drop
`1 - mean / reference` of every metric (COCO-O's robustness gap).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
from typing import Sequence

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from retinanet_jax import checkpoints
from retinanet_jax import config as config_lib
from retinanet_jax import data as data_lib
from retinanet_jax.data import coco_format
from retinanet_jax.evaluation import evaluator as evaluator_lib
from retinanet_jax.metrics import coco
from retinanet_jax.metrics import results_file
from retinanet_jax.runtime import mesh as mesh_lib

IMAGES_DIR = "val2017"
ANNOTATIONS_FILE = os.path.join("annotations", "instances_val2017.json")
SPLIT = "validation"


@dataclasses.dataclass(frozen=True)
class Domain:
  """A COCO-format folder: `name` (the folder's name), `images_dir`, `annotations_file`."""

  name: str
  root: str
  images_dir: str
  annotations_file: str


def domain_from_folder(path: str) -> Domain:
  """The domain of folder `path`; raises naming what is missing from the layout."""
  root = os.path.abspath(os.path.expanduser(path))
  images, annotations = os.path.join(root, IMAGES_DIR), os.path.join(root, ANNOTATIONS_FILE)
  missing = [p for p, ok in ((images, os.path.isdir(images)),
                             (annotations, os.path.isfile(annotations))) if not ok]
  if missing:
    raise FileNotFoundError(f"{root} is not a COCO-format folder: missing {', '.join(missing)} "
                            f"(expected {IMAGES_DIR}/ and {ANNOTATIONS_FILE})")
  return Domain(os.path.basename(root.rstrip(os.sep)), root, images, annotations)


def domains_under(root: str) -> list[Domain]:
  """The domains among the subfolders of `root` (COCO-O's six), in name order; subfolders without
  the layout are logged and left out; none at all is an error."""
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root} is not a folder")
  found, other = [], []
  for name in sorted(os.listdir(root)):
    if not os.path.isdir(os.path.join(root, name)):
      continue
    try:
      found.append(domain_from_folder(os.path.join(root, name)))
    except FileNotFoundError:
      other.append(name)
  if other:
    logging.warning("%s: subfolders without %s/ and %s left out: %s", root, IMAGES_DIR,
                    ANNOTATIONS_FILE, other)
  if not found:
    raise FileNotFoundError(f"no COCO-format folder (<domain>/{IMAGES_DIR}/ and <domain>/"
                            f"{ANNOTATIONS_FILE}) under {root}; subfolders: {other}")
  return found


def dataset_name(domain: Domain) -> str:
  """The cached TFDS copy's name: the folder's name and a hash of its path and annotations."""
  digest = hashlib.sha256(domain.root.encode())
  with open(domain.annotations_file, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  slug = re.sub(r"[^a-zA-Z0-9]+", "_", domain.name).strip("_").lower() or "domain"
  return f"multidomain_{slug}_{digest.hexdigest()[:10]}"


def cached_dataset(domain: Domain, *, data_dir: str | None) -> str:
  """The TFDS name of `domain`'s copy in `data_dir` (None: TFDS's default), built when absent
  (module docstring). Processes of one job: process 0 builds, the others wait for it."""
  name = dataset_name(domain)
  folder = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)

  def prepared() -> bool:
    try:
      return tfds.builder(name, data_dir=folder).is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
      return False

  def build() -> None:
    if prepared():
      return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f".{name}.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        if not prepared():
          logging.info("Preparing %s (%s) as TFDS %s in %s", domain.name, domain.root, name, folder)
          source = coco_format.SplitSource(coco_format.load_annotations(domain.annotations_file),
                                           coco_format.image_reader(domain.images_dir))
          _, report = coco_format.build_tfds_dataset(
              name, {SPLIT: source}, data_dir=folder,
              description=f"COCO-format folder {domain.root}, prepared for evaluation")
          if report.skipped_images or report.skipped_annotations:
            logging.warning("%s: %d images and %d annotations skipped (listed in %s)", domain.name,
                            len(report.skipped_images), len(report.skipped_annotations),
                            os.path.join(folder, name, coco_format.REPORT_FILE))
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)

  if jax.process_count() > 1:
    if jax.process_index() == 0:
      build()
    multihost_utils.sync_global_devices(f"retinanet_jax.multi_domain.{name}")
  build()
  return name


@dataclasses.dataclass(frozen=True)
class DomainResult:
  """One evaluated dataset: its name, where it came from, its image count and `coco.CocoResult`."""

  name: str
  source: str
  num_images: int
  result: coco.CocoResult
  detections_file: str | None = None

  def to_json(self) -> dict:
    return {"name": self.name, "source": self.source, "num_images": self.num_images,
            "metrics": self.result.metrics, "detections_file": self.detections_file,
            **self.result.to_json()}


@dataclasses.dataclass(frozen=True)
class MultiDomainResult:
  """Module docstring. `mean`: each metric's mean over the domains (of the defined values; -1 if
  none); `relative_drop`: `1 - mean / reference` per metric (None without a reference or where the
  reference is not positive)."""

  domains: list
  reference: DomainResult | None
  mean: dict
  relative_drop: dict | None

  def to_json(self) -> dict:
    return {"domains": [d.to_json() for d in self.domains],
            "mean": self.mean, "num_domains": len(self.domains),
            "reference": self.reference.to_json() if self.reference else None,
            "relative_drop": self.relative_drop}


def summarize_domains(domains: Sequence[DomainResult],
                      reference: DomainResult | None = None) -> MultiDomainResult:
  """The mean over `domains` and the relative drop against `reference` (see `MultiDomainResult`)."""
  if not domains:
    raise ValueError("no domains to summarize")
  names = list(domains[0].result.metrics)
  mean = {}
  for n in names:
    values = [d.result.metrics[n] for d in domains if d.result.metrics[n] >= 0]
    mean[n] = sum(values) / len(values) if values else -1.0
  drop = None
  if reference is not None:
    drop = {n: (1.0 - mean[n] / reference.result.metrics[n]
                if reference.result.metrics.get(n, -1) > 0 and mean[n] >= 0 else None)
            for n in names}
  return MultiDomainResult(list(domains), reference, mean, drop)


def format_report(result: MultiDomainResult) -> str:
  """The table printed by scripts/evaluate.py: one row per domain, the mean, the reference and the
  relative drop (AP and AR in percent)."""
  names = [n for n in result.mean if n.startswith("AP")][:6]
  rows = [(d.name, d.num_images, d.result.metrics) for d in result.domains]
  rows.append((f"mean of {len(result.domains)}", sum(d.num_images for d in result.domains),
               result.mean))
  if result.reference is not None:
    rows.append((f"{result.reference.name} (reference)", result.reference.num_images,
                 result.reference.result.metrics))
  width = max(len(r[0]) for r in rows + [("domain", 0, {})])
  fmt = lambda v: f"{100 * v:6.2f}" if v >= 0 else f"{'n/a':>6}"
  lines = [f"{'domain':<{width}} {'images':>7} | " + " | ".join(f"{n:>6}" for n in names)]
  for name, count, metrics in rows:
    lines.append(f"{name:<{width}} {count:>7} | " + " | ".join(fmt(metrics[n]) for n in names))
  if result.relative_drop is not None:
    drop = result.relative_drop.get(names[0])
    lines.append(f"relative drop of the mean {names[0]} against {result.reference.name}: "
                 + (f"{100 * drop:.1f}%" if drop is not None else "n/a"))
  return "\n".join(lines)


def evaluate_saved_on_domains(path: str, domains: Sequence[Domain], *, config=None,
                              reference: str | None = None, data_dir: str | None = None,
                              output_dir: str | None = None) -> MultiDomainResult:
  """COCO evaluation of the model saved at `path` (`checkpoints.load_model`) on every domain, and on
  the reference when given ('config': `config.data`'s evaluation split; or a COCO-format folder).

  Args:
    path: a training run, one of its steps, or converted weights.
    domains: `domain_from_folder` / `domains_under` results.
    config: a `config.Config` or `ConfigDict` (geometry and evaluation settings); None: the
      training run's own `config.json`.
    reference: None, 'config' or a folder.
    data_dir: where the domains' TFDS copies are cached (None: `config.data.data_dir`, else TFDS's
      default).
    output_dir: writes `multi_domain_<step|converted>.json` there (the `to_json()` of the result,
      with each dataset's COCO results in `detections_<step|converted>_<dataset>.json`,
      plus the checkpoint) when given.
  """
  if not domains:
    raise ValueError("no domains given")
  if config is None:
    try:
      config = config_lib.load_run_config(path)
    except FileNotFoundError as e:
      raise ValueError(f"{e}: give a config for the geometry and evaluation settings") from None
  config = config_lib.Config.from_config_dict(config)
  if config.eval.metric != "coco":
    raise config_lib.ConfigError([f"eval.metric: {config.eval.metric!r}, but multi-domain "
                                  f"evaluation reports COCO AP; use 'coco'"])
  cache = data_dir if data_dir is not None else config.data.data_dir
  loaded = checkpoints.load_model(path)
  mesh = mesh_lib.make_mesh()
  params = evaluator_lib.replicate(loaded.params, mesh)
  rest = evaluator_lib.replicate(loaded.rest, mesh)
  step_fn = None

  tag = evaluator_lib.checkpoint_tag(loaded)

  def detections_path(name: str) -> str | None:
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", name).strip("_").lower() or "dataset"
    return evaluator_lib.output_files(output_dir, tag, name=slug)["detections"] if output_dir else None

  def run(name: str, source: str, data_config, *, file_name: str) -> DomainResult:
    nonlocal step_fn
    evaluator = evaluator_lib.Evaluator.for_data(
        data_config, eval_config=config.eval, graphdef=loaded.graphdef,
        description=loaded.description, mesh=mesh, step_fn=step_fn)
    step_fn = evaluator.step_fn  # one geometry: compiled once, shared by every domain
    result, detections = evaluator.evaluate(params, rest)
    logging.info("%s: AP %.4f on %d images", name, result.metrics[next(iter(result.metrics))],
                 evaluator.num_images)
    path = detections_path(file_name)
    if path and jax.process_index() == 0:
      os.makedirs(output_dir, exist_ok=True)
      results_file.write_results(path, detections)
    return DomainResult(name, source, evaluator.num_images, result, path)

  def folder_config(domain: Domain):
    return dataclasses.replace(config.data, name=cached_dataset(domain, data_dir=cache),
                               data_dir=cache, eval_split=SPLIT, eval_annotations=None)

  names = [d.name for d in domains]
  shown = [n if names.count(n) == 1 else os.path.join(os.path.basename(os.path.dirname(d.root)), n)
           for n, d in zip(names, domains)]  # two folders of one name: their parents tell them apart
  reference_domain = domain_from_folder(reference) if reference not in (None, "", "config") else None
  reference_name = (config.data.name if reference == "config"
                    else reference_domain.name if reference_domain else None)
  out = os.path.join(output_dir, f"multi_domain_{tag}.json") if output_dir else None
  if output_dir:  # every file to write, checked before anything runs
    evaluator_lib.refuse_existing(
        [out] + [detections_path(n) for n in shown]
        + ([detections_path(f"reference_{reference_name}")] if reference_name else []))
  results = [run(n, d.root, folder_config(d), file_name=n) for n, d in zip(shown, domains)]
  ref = None
  if reference == "config":
    if config.data.name == "synthetic":
      data_lib.ensure_synthetic_dataset(config.data)
    ref = run(config.data.name, f"{config.data.name} {config.data.eval_split}", config.data,
              file_name=f"reference_{reference_name}")
  elif reference_domain:
    ref = run(reference_domain.name, reference_domain.root, folder_config(reference_domain),
              file_name=f"reference_{reference_name}")
  result = summarize_domains(results, ref)
  if output_dir and jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(out, "x") as f:
      json.dump({"checkpoint": os.path.abspath(path), **result.to_json()}, f, indent=2)
  return result
