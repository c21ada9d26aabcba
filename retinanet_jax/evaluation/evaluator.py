"""`Evaluator`: runs a model over an evaluation split and scores it with COCO metrics.

    evaluator = Evaluator.for_data(config.data, eval_config=config.eval, graphdef=eval_graphdef,
                                   description=description, mesh=mesh)
    metrics, detections = evaluator.run(params, rest)
    result, detections = evaluator.evaluate(params, rest)  # metrics, AP per category, maxDets

One evaluator serves training (evaluations during and after the run), scripts/evaluate.py (a saved
model) and the benchmark. Built once, from the evaluation input, its COCO ground truth, and the model's
label map (class -> dataset category id; a converted torchvision model predicts 91 classes indexed by
COCO category id, a trained one its dataset's); its eval step (network + post-processing, a
per-device function under `jit(shard_map)` like the train step) is compiled on the first `run`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import checkpoints
from retinanet_jax import config as config_lib
from retinanet_jax import data as data_lib
from retinanet_jax import postprocess
from retinanet_jax.data import coco_format
from retinanet_jax.data import labels as labels_lib
from retinanet_jax.metrics import coco
from retinanet_jax.metrics import miss_rate
from retinanet_jax.metrics import results_file
from retinanet_jax.metrics import scoring
from retinanet_jax.models import preprocessing
from retinanet_jax.runtime import console
from retinanet_jax.runtime import mesh as mesh_lib
from retinanet_jax.runtime.mesh import DATA_AXIS


def eval_step(graphdef, params, rest, batch: dict, *, anchor_set: anchor_lib.AnchorSet,
              input_convention: str, eval_config: config_lib.EvalConfig) -> postprocess.Detections:
  """Network + post-processing on this device's images; boxes in network-input pixels."""
  model = nnx.merge(graphdef, params, rest, copy=True)  # copy: fresh Variables in this trace
  images = preprocessing.normalize_images(batch["image"], batch["image_hw"],
                                          convention=input_convention)
  cls_logits, box_deltas = model(images)
  e = eval_config
  return postprocess.postprocess_detections(
      cls_logits, box_deltas, anchors=anchor_set, image_hw=batch["image_hw"],
      score_threshold=e.score_threshold, topk_candidates=e.topk_candidates,
      nms_threshold=e.nms_threshold, max_detections=e.max_detections, nms_mode=e.nms_mode)


def compile_eval_step(graphdef, *, anchor_set, input_convention, eval_config, mesh):
  """`jit(shard_map(eval_step))`: parameters replicated, batch and detections sharded over 'data'."""
  step = functools.partial(eval_step, graphdef, anchor_set=anchor_set,
                           input_convention=input_convention, eval_config=eval_config)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                          out_specs=P(DATA_AXIS), check_vma=False)
  return jax.jit(sharded)


def _to_host(x) -> np.ndarray:
  """A global array, gathered to every host as NumPy."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class Evaluator:
  """COCO evaluation of one model graph on one evaluation input (module docstring).

  Attributes:
    eval_input: a re-iterable `data.EvalInput` (every image once across hosts; padding examples
      have `example_mask` False).
    ground_truth: its COCO ground truth (original pixels, dataset category ids).
    label_map: the model's classes -> dataset category ids and names.
    step_fn: the compiled eval step, `(params, rest, batch) -> Detections`.
    max_dets, backend: the COCO evaluation's maxDets and engine (`config.EvalConfig`).
    metric, miss_rate_category: 'coco' or 'miss_rate' (pedestrian MR^-2) and its category.
    count_threshold: score threshold of the counting metrics (evaluation/counting.py); None:
      chosen on this split.
  """

  eval_input: Any
  ground_truth: dict
  label_map: labels_lib.LabelMap
  step_fn: Any
  max_dets: tuple = coco.DEFAULT_MAX_DETS
  backend: str = "pycocotools"
  metric: str = "coco"
  miss_rate_category: str = ""
  count_threshold: float | None = None

  @classmethod
  def for_data(cls, data_config, *, eval_config: config_lib.EvalConfig, graphdef, description,
               mesh, step_fn=None) -> Evaluator:
    """The evaluator of `data_config.eval_split` for a model with `description`
    (`model_description.ModelDescription`: anchors, input convention, label map) and `graphdef`
    (evaluation mode). `step_fn`: the compiled step of another evaluator of the same model,
    geometry and settings (multi-domain evaluation), reused instead of compiling a new one."""
    eval_input = data_lib.make_eval_input(data_config, global_batch_size=eval_config.batch_size,
                                          mesh=mesh)
    image_hw = data_lib.padded_hw(data_lib.TransformConfig.from_data_config(data_config))
    anchor_set = anchor_lib.generate_anchors(image_hw, config=description.anchors)
    if step_fn is None:
      step_fn = compile_eval_step(graphdef, anchor_set=anchor_set,
                                  input_convention=description.input_convention,
                                  eval_config=eval_config, mesh=mesh)
    ground_truth = data_lib.coco_ground_truth(data_config)
    if eval_config.metric == "miss_rate":  # a category that is not there fails before training
      miss_rate.evaluated_category(ground_truth["categories"], eval_config.miss_rate_category)
    return cls(eval_input=eval_input, ground_truth=ground_truth,
               label_map=description.label_map, step_fn=step_fn,
               max_dets=tuple(eval_config.max_dets), backend=eval_config.backend,
               metric=eval_config.metric, miss_rate_category=eval_config.miss_rate_category,
               count_threshold=eval_config.count_score_threshold)

  @property
  def num_images(self) -> int:
    return len(self.ground_truth["images"])

  def run(self, params, rest) -> tuple[dict[str, float], list[dict]]:
    """`(metrics, coco_detections)` over the whole evaluation split, once (`evaluate`'s summary)."""
    result, detections = self.evaluate(params, rest)
    return result.metrics, detections

  def predict(self, params, rest) -> tuple[list[dict], list[int]]:
    """`(coco_detections, image_ids)`: the model run once over the whole split, its detections as
    COCO results (original pixels, dataset category ids) and the ids of the images it saw, in
    order. Detections of every host are gathered to every host; padded examples are dropped."""
    detections, seen = [], []
    batches = console.progress(self.eval_input, desc=f"Evaluating {self.num_images} images",
                               total=len(self.eval_input))  # a line on a terminal, else periodic
    for batch in batches:
      det = self.step_fn(params, rest, batch)
      fields = {k: _to_host(getattr(det, k)) for k in ("boxes", "scores", "classes", "valid")}
      meta = {k: _to_host(batch[k]) for k in ("image_id", "scale", "example_mask")}
      keep = meta["example_mask"].astype(bool)
      detections += coco.detections_to_coco(
          image_ids=meta["image_id"], boxes=fields["boxes"], scores=fields["scores"],
          classes=fields["classes"], valid=fields["valid"] & keep[:, None],
          category_ids=self.label_map.category_ids, scale=meta["scale"])
      seen += [int(i) for i in meta["image_id"][keep]]
    return detections, seen

  def evaluate(self, params, rest) -> tuple[coco.CocoResult | miss_rate.MissRateResult, list[dict]]:
    """`(result, coco_detections)` over the whole evaluation split, once (`predict`), scored by
    `metrics.scoring.score`: a `coco.CocoResult` (the summary at `max_dets`, AP per category, and
    the counting metrics `count_mae`, `count_rmse`, `count_threshold`, `count_threshold_chosen`)
    or, with metric 'miss_rate', a `miss_rate.MissRateResult`. Raises if an image of the ground
    truth was never evaluated or was evaluated twice."""
    detections, evaluated = self.predict(params, rest)
    expected = sorted(int(im["id"]) for im in self.ground_truth["images"])
    if sorted(evaluated) != expected:
      missing = sorted(set(expected) - set(evaluated))
      extra = sorted(set(evaluated) - set(expected))
      twice = len(evaluated) - len(set(evaluated))
      raise RuntimeError(f"evaluation saw {len(evaluated)} images for {len(expected)} in the ground "
                         f"truth: missing {missing[:10]}, unknown {extra[:10]}, {twice} seen twice")
    result = scoring.score(self.ground_truth, detections, metric=self.metric,
                           max_dets=self.max_dets, backend=self.backend,
                           miss_rate_category=self.miss_rate_category,
                           count_threshold=self.count_threshold)
    return result, detections


def replicate(tree, mesh):
  """`tree` placed on every device of `mesh` (the evaluator's parameter layout)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def checkpoint_tag(loaded) -> str:
  """`<step>` of a training checkpoint, `converted` for converted weights: the suffix of the files
  an evaluation writes (`eval_<tag>.json`, `detections_<tag>.json`)."""
  return "converted" if loaded.step is None else str(loaded.step)


def output_files(output_dir: str, tag: str, *, name: str = "") -> dict[str, str]:
  """The files an evaluation writes into `output_dir`: `eval_<tag>[_<name>].json` (metrics) and
  `detections_<tag>[_<name>].json` (its COCO results)."""
  suffix = f"{tag}_{name}" if name else tag
  return {"metrics": os.path.join(output_dir, f"eval_{suffix}.json"),
          "detections": os.path.join(output_dir, f"detections_{suffix}.json")}


def refuse_existing(paths) -> None:
  """Raises `FileExistsError` naming every path of `paths` that exists (nothing is overwritten)."""
  clashes = [p for p in paths if os.path.lexists(p)]
  if clashes:
    raise FileExistsError(f"{len(clashes)} file(s) this evaluation would write exist already: "
                          f"{', '.join(clashes)}; nothing was written. Give another --output "
                          f"(evaluation never overwrites a file).")


def _typed_config(path: str, config):
  if config is None:
    try:
      config = config_lib.load_run_config(path)
    except FileNotFoundError as e:
      raise ValueError(f"{e}: give a config to choose the data to evaluate on") from None
  return config_lib.Config.from_config_dict(config)


def evaluate_saved_model(path: str, *, config=None, output_dir: str | None = None) -> dict[str, float]:
  """The summary metrics of `evaluate_saved` (same arguments)."""
  return evaluate_saved(path, config=config, output_dir=output_dir).metrics


def evaluate_saved(path: str, *, config=None, output_dir: str | None = None):
  """The evaluation (`coco.CocoResult`, or `miss_rate.MissRateResult` with eval.metric
  'miss_rate') of the model saved at `path` (`checkpoints.load_model`: a training run, one of its
  steps, or converted weights) on the eval split of `config.data` (a `config.Config` or
  `ConfigDict`); without `config`, the training run's own `config.json` chooses the data and the
  evaluation settings. With `output_dir`, writes `eval_<step|converted>.json` (the metrics) and
  `detections_<step|converted>.json` (the COCO results they score; `scripts/evaluate.py
  --detections=FILE` scores such a file again) there; a file that exists already stops the
  evaluation before the model runs (`FileExistsError`)."""
  config = _typed_config(path, config)
  loaded = checkpoints.load_model(path)
  files = output_files(output_dir, checkpoint_tag(loaded)) if output_dir else {}
  refuse_existing(files.values())
  if config.data.name == "synthetic":
    data_lib.ensure_synthetic_dataset(config.data)
  mesh = mesh_lib.make_mesh()
  evaluator = Evaluator.for_data(config.data, eval_config=config.eval, graphdef=loaded.graphdef,
                                 description=loaded.description, mesh=mesh)
  result, detections = evaluator.evaluate(replicate(loaded.params, mesh),
                                          replicate(loaded.rest, mesh))
  if output_dir and jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    results_file.write_results(files["detections"], detections)
    coco.write_metrics(files["metrics"], result.metrics, checkpoint=os.path.abspath(path),
                       num_detections=len(detections), detections_file=files["detections"],
                       **result.to_json())
  return result


def predict_saved(path: str, *, config=None, output_dir: str, testset: str,
                  algorithm: str = "retinanet-jax", log=print) -> str:
  """Runs the model saved at `path` over the eval split of `config.data` (no metrics: the split
  may have no annotations, e.g. COCO's test2017) and writes the COCO results file the evaluation
  server expects, `output_dir/detections_<testset>_<algorithm>_results.json`
  (`results_file.submission_name`); returns its path.

  The images are those of `data.eval_annotations` when set (any COCO-format file: an image-info
  file has images and categories only), else of the split's ground truth: for COCO test-dev, the
  TFDS split 'test' (test2017) with `data.eval_annotations` = `image_info_test-dev2017.json`, whose
  20,288 images are kept; detections of the split's other images are left out, and their count is
  logged with `log`. The file exists already: `FileExistsError` before the model runs."""
  config = _typed_config(path, config)
  out = os.path.join(output_dir, results_file.submission_name(testset, algorithm))
  refuse_existing([out])
  loaded = checkpoints.load_model(path)
  if config.data.name == "synthetic":
    data_lib.ensure_synthetic_dataset(config.data)
  mesh = mesh_lib.make_mesh()
  evaluator = Evaluator.for_data(config.data, eval_config=config.eval, graphdef=loaded.graphdef,
                                 description=loaded.description, mesh=mesh)
  detections, seen = evaluator.predict(replicate(loaded.params, mesh), replicate(loaded.rest, mesh))
  image_info = (coco_format.load_annotations(config.data.eval_annotations)
                if config.data.eval_annotations else evaluator.ground_truth)
  wanted = {int(im["id"]) for im in image_info.get("images", [])}
  missing = wanted - set(seen)
  if missing:
    raise RuntimeError(f"{len(missing)} images of the ground truth / image info are not in the "
                       f"split {config.data.eval_split!r} (e.g. {sorted(missing)[:10]}): choose the "
                       f"split that holds them (--config.data.eval_split)")
  others = sorted(set(seen) - wanted)
  if others:
    log(f"{len(others)} images of the split {config.data.eval_split!r} are not in the image info "
        f"(e.g. {others[:5]}); their detections are left out of the results file")
  detections = [d for d in detections if d["image_id"] in wanted]
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    results_file.write_results(out, detections)
  log(f"Wrote {len(detections)} detections of {len(wanted)} images to {out}")
  return out
