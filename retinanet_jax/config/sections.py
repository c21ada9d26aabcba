"""The typed training config: one frozen dataclass per section, built and validated once.

    config = Config.from_config_dict(FLAGS.config)   # at the command-line boundary
    config.loss.gamma, config.train.base_lr, config.runtime.donate_state

`configs/*.py` are `ml_collections` files (`get_config(arg)`) that start from `default_config()`
(config/files.py), the paper's setting, and change a few fields; `--config.SECTION.FIELD=VALUE`
overrides a leaf. The library reads only `Config`: `Config.from_config_dict` checks every field of
every section in one pass (unknown names, values outside a field's choices, inconsistent values) and
raises one `typed_config.ConfigError` listing them all, each with the field's path, the value and the
allowed values, before anything is compiled.

Sections:
  model    `models.retinanet.RetinaNetConfig`: the architecture (stored in checkpoints).
  anchors  `anchors.AnchorConfig` (stored in checkpoints).
  matching `MatchingConfig`: anchor labelling (`labeling.label_anchors`).
  loss     `LossConfig`: focal and box losses (`losses`), and the normalizer (`training/train_step`).
  data     `data.config.DataConfig`: the input pipeline.
  train    `TrainConfig`: optimizer, schedule, loop, checkpoints.
  eval     `EvalConfig`: post-processing and evaluation.
  runtime  `RuntimeConfig`: choices that change speed, never results or checkpoints (kernel
           gradients, donation, reduction order, XLA flags, the compilation cache). Never persisted.
Top-level fields: `seed`, `input_convention`, `init_from`, `init_mode`.

Which reference implementation uses which value is said at each field (docs/configs.md's table).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from typing import Optional

import ml_collections

from retinanet_jax import anchors as anchor_lib
from retinanet_jax import losses
from retinanet_jax import matching
from retinanet_jax import postprocess
from retinanet_jax.config import derived
from retinanet_jax.data import config as data_config_lib
from retinanet_jax.metrics import coco as coco_lib
from retinanet_jax.models import convolution
from retinanet_jax.models import retinanet as retinanet_lib
from retinanet_jax.runtime import collectives
from retinanet_jax.runtime import typed_config
from retinanet_jax.runtime import xla_flags

ConfigError = typed_config.ConfigError

BOX_LOSSES = losses.BOX_LOSSES
NORMALIZERS = ("batch", "ema")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
INIT_MODES = ("model", "backbone")
DONATE_STATE = ("auto", "always", "never")
INPUT_CONVENTIONS = ("torchvision", "caffe", "caffe_fair")
EVAL_METRICS = ("coco", "miss_rate")
ON_DAMAGED_CHECKPOINT = ("fall_back", "stop")
ON_DIVERGENCE = ("warn", "stop", "skip", "off")


def _choice(default, options):
  return dataclasses.field(default=default, metadata={"choices": tuple(options)})


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
  """Anchor-to-ground-truth matching (`matching.match_anchors`).

  Attributes:
    positive_threshold: IoU >= this makes an anchor positive (0.5: paper, all references).
    negative_threshold: IoU < this makes it negative; between the two it is ignored (0.4).
    low_quality: 'ties' (torchvision, detectron2: every anchor tied for a box's best IoU is
      positive), 'force' (TF Model Garden: the best anchor of each box), 'none'.
  """

  positive_threshold: float = 0.5
  negative_threshold: float = 0.4
  low_quality: str = _choice("ties", matching.LOW_QUALITY_MODES)

  def __post_init__(self):
    if not 0.0 <= self.negative_threshold <= self.positive_threshold <= 1.0:
      raise ValueError(f"need 0 <= negative_threshold <= positive_threshold <= 1, got "
                       f"{self.negative_threshold}, {self.positive_threshold}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The RetinaNet loss (`losses.retinanet_losses`) and its normalizer (`train_step`).

  Attributes:
    alpha, gamma: focal loss (0.25 and 2: the paper's).
    box_loss: 'smooth_l1' (paper, detectron2, beta 0.1), 'l1' (torchvision v1), 'giou'
      (torchvision v2), 'huber' (TF Model Garden, delta 0.1).
    smooth_l1_beta, huber_delta: their parameters.
    box_loss_weight: weight of the box loss against the focal loss.
    normalizer: 'batch' (positive anchors of the global batch, summed over devices) or 'ema'
      (detectron2's exponential moving average of it).
    normalizer_momentum, normalizer_init: the EMA's momentum and start (detectron2: 0.9, 100).
  """

  alpha: Optional[float] = 0.25
  gamma: float = 2.0
  box_loss: str = _choice("smooth_l1", BOX_LOSSES)
  smooth_l1_beta: float = 0.1
  huber_delta: float = 0.1
  box_loss_weight: float = 1.0
  normalizer: str = _choice("batch", NORMALIZERS)
  normalizer_momentum: float = 0.9
  normalizer_init: float = 100.0

  def __post_init__(self):
    if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be None or in [0, 1], got {self.alpha}")
    if self.gamma < 0:
      raise ValueError(f"gamma must be >= 0, got {self.gamma}")
    if not 0.0 <= self.normalizer_momentum < 1.0:
      raise ValueError(f"normalizer_momentum must be in [0, 1), got {self.normalizer_momentum}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimization and the training loop (`optimizer.py`, `train.py`).

  Attributes:
    batch_size: global, over all devices and hosts.
    steps: optimizer steps.
    optimizer: 'sgd' (paper, detectron2; momentum) or 'adamw' (torchvision v2 recipe).
    base_lr: per 16 images (scaled linearly with batch_size; detectron2's 1x: 0.01).
    momentum, weight_decay: SGD momentum; weight decay (both optimizers).
    schedule: 'step' (x decay_factor at each of decay_steps) or 'cosine' (to 0 at `steps`).
    warmup_steps, warmup_factor: linear warm-up from warmup_factor * lr.
    grad_clip_norm: global-norm gradient clipping; 0 is off.
    log_every: steps between console/metric lines.
    check_finite_every: steps between host checks of the non-finite guard (a device sync).
    checkpoint_every, keep_checkpoints: checkpoint period and how many are kept.
    eval_every: steps between evaluations during training; 0: only at the end.
    on_damaged_checkpoint: when the checkpoint to resume from cannot be read back (a truncated or
      corrupted file, a damaged input-iterator position): 'fall_back' (default) moves its folders
      to `workdir/damaged/` (never deleted), says so, and resumes from the newest checkpoint that
      restores (or from scratch if none does); 'stop' stops with one paragraph naming the step
      and the folder (exit code 4) and moves nothing.
    on_divergence: the divergence guard (training/train_step.py), for a loss that explodes yet stays
      finite (the non-finite guard catches the rest): a step diverges when its loss exceeds
      `divergence_factor` x the median of the previous `divergence_window` losses, and the run has
      diverged after `divergence_patience` such steps in a row. 'warn' (default): a warning naming
      the first step of the streak, and a line in the final summary; 'stop': stop there, like the
      non-finite guard (exit code 5); 'skip': as 'warn', and every step whose loss is above the
      threshold applies no update; 'off'.
    divergence_factor, divergence_patience, divergence_window: see on_divergence (10, 3, 50).
  """

  batch_size: int = 16
  steps: int = 90_000
  optimizer: str = _choice("sgd", OPTIMIZERS)
  base_lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 1e-4
  schedule: str = _choice("step", SCHEDULES)
  decay_steps: tuple[int, ...] = (60_000, 80_000)
  decay_factor: float = 0.1
  warmup_steps: int = 1000
  warmup_factor: float = 0.001
  grad_clip_norm: float = 0.0
  log_every: int = 20
  check_finite_every: int = 1
  checkpoint_every: int = 5000
  keep_checkpoints: int = 3
  eval_every: int = 0
  on_damaged_checkpoint: str = _choice("fall_back", ON_DAMAGED_CHECKPOINT)
  on_divergence: str = _choice("warn", ON_DIVERGENCE)
  divergence_factor: float = 10.0
  divergence_patience: int = 3
  divergence_window: int = 50

  def __post_init__(self):
    if self.divergence_factor <= 1:
      raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")
    for name in ("batch_size", "steps", "log_every", "check_finite_every", "checkpoint_every",
                 "keep_checkpoints", "divergence_patience", "divergence_window"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.base_lr <= 0:
      raise ValueError(f"base_lr must be > 0, got {self.base_lr}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Post-processing (`postprocess.postprocess_detections`) and evaluation.

  Attributes:
    batch_size: global evaluation batch.
    score_threshold, topk_candidates, nms_threshold, max_detections: torchvision's and
      detectron2's 0.05, 1000 per level, 0.5 and 100.
    at_end: evaluate when training ends.
    num_images_png: a PNG of this many validation images with their detections (0: none).
    png_score: detections drawn on it score at least this.
    max_dets: pycocotools' maxDets, strictly increasing: the summary's AP and area-AR are at the last
      value M and AR at each (evaluation/coco.py; COCO's (1, 10, 100); dense scenes, e.g.
      SKU-110K: (1, 10, 100, 300)). Names carry M when M != 100 (AP@300, AR300). M may not exceed
      max_detections (the numbers at M would be those at max_detections under another name).
    backend: the COCOeval engine, 'pycocotools' (the reference) or 'faster_coco_eval' (the optional
      `faster-coco-eval` package, `pip install faster-coco-eval`; same numbers, faster).
    metric: 'coco' (COCO AP, evaluation/coco.py) or 'miss_rate' (pedestrians: the Caltech /
      CityPersons log-average miss rate MR^-2 on the Reasonable, Small, Heavy and All subsets,
      evaluation/miss_rate.py; the ground truth's visibility and ignore fields are read).
    miss_rate_category: metric 'miss_rate': the name of the evaluated category; '' picks the one
      named 'pedestrian' or 'person', or the only one.
    nms_mode: 'tiled' (sorted candidates in tiles: scales with max_detections) or 'rounds' (one
      round per kept box); identical detections (postprocess.py). Dense scenes (max_detections in
      the hundreds or thousands) want 'tiled'.
    count_score_threshold: counting (evaluation/counting.py): an image's count is its detections
      scoring at least this; None: chosen on the evaluated split (the lowest count MAE over the
      grid 0.05..0.95), and reported with the metrics as `count_threshold`.
  """

  batch_size: int = 8
  score_threshold: float = 0.05
  topk_candidates: int = 1000
  nms_threshold: float = 0.5
  max_detections: int = 100
  at_end: bool = True
  num_images_png: int = 8
  png_score: float = 0.3
  max_dets: tuple[int, ...] = coco_lib.DEFAULT_MAX_DETS
  backend: str = _choice("pycocotools", coco_lib.BACKENDS)
  metric: str = _choice("coco", EVAL_METRICS)
  miss_rate_category: str = ""
  nms_mode: str = _choice("tiled", postprocess.NMS_MODES)
  count_score_threshold: Optional[float] = None

  def __post_init__(self):
    problems = []
    if self.batch_size < 1 or self.topk_candidates < 1 or self.max_detections < 1:
      problems.append(f"batch_size, topk_candidates and max_detections must be >= 1, got "
                      f"{self.batch_size}, {self.topk_candidates}, {self.max_detections}")
    try:
      coco_lib.check_max_dets(self.max_dets)
    except ValueError as e:
      problems.append(str(e))
    else:
      if self.max_dets[-1] > self.max_detections:
        problems.append(
            f"max_dets {tuple(self.max_dets)} ends above max_detections={self.max_detections}: "
            f"the post-processing keeps at most {self.max_detections} detections per image, so "
            f"the numbers at maxDets {self.max_dets[-1]} would be those at {self.max_detections}; "
            f"raise max_detections to >= {self.max_dets[-1]} or end max_dets at <= "
            f"{self.max_detections}")
    if self.count_score_threshold is not None and not 0 <= self.count_score_threshold <= 1:
      problems.append(f"count_score_threshold must be in [0, 1] (a score) or None (chosen on the "
                      f"evaluated split), got {self.count_score_threshold}")
    if (self.backend == "faster_coco_eval"
        and importlib.util.find_spec("faster_coco_eval") is None):
      problems.append(f"backend 'faster_coco_eval' needs the optional package faster-coco-eval, "
                      f"which is not installed: {coco_lib.FASTER_COCO_EVAL_PIP}; or use "
                      f"eval.backend='pycocotools'")
    if problems:
      raise ValueError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How this process runs, never what it computes: not part of the model, never persisted.

  Attributes:
    conv_kernel_gradient: convolution kernel gradients in training (models/convolution.py):
      'auto' ('nhwc' on the CPU, -18% step time; 'xla' elsewhere), 'xla' or 'nhwc'.
    donate_state: 'auto' donates the state to the train step except on the CPU (where donation
      makes XLA copy the whole state: -5 to -7%, docs/benchmarks.md), 'always', 'never'.
    grad_reduction: 'psum' (XLA's all-reduce) or 'ordered' (sums in device order on any layout:
      the same bits on 1 host x 4 devices and 2 x 2; runtime/collectives.py).
    xla_flags_cpu: XLA flags for the CPU backend, applied by the scripts before JAX starts
      (retinanet_jax/runtime/xla_flags.py; a flag already in $XLA_FLAGS wins; '' adds none).
    compilation_cache_dir: JAX's persistent compilation cache; '{workdir}' stands for --workdir;
      '' turns it off; $JAX_COMPILATION_CACHE_DIR, if set, wins.
    matching_block_size: ground-truth slots per block of the anchor-box IoU in matching
      (matching.py): 0 (auto) splits the M slots into M // 16 blocks of equal size (16 to 31
      slots; one block when M < 32), the fastest on the CPU, with the memory of a few [block, A]
      IoU blocks whatever M; M is the dense form (the whole [M, A] matrix at once). The targets
      are identical for every value; only memory and speed change.
  """

  conv_kernel_gradient: str = _choice("auto", convolution.KERNEL_GRADIENTS)
  donate_state: str = _choice("auto", DONATE_STATE)
  grad_reduction: str = _choice("psum", collectives.MODES)
  xla_flags_cpu: str = " ".join(xla_flags.CPU_FLAGS)
  compilation_cache_dir: str = "{workdir}/compilation_cache"
  matching_block_size: int = 0

  def __post_init__(self):
    if self.matching_block_size < 0:
      raise ValueError(f"matching_block_size must be >= 0 (0: auto), got {self.matching_block_size}")


SECTIONS = {
    "model": retinanet_lib.RetinaNetConfig, "anchors": anchor_lib.AnchorConfig,
    "matching": MatchingConfig, "loss": LossConfig, "data": data_config_lib.DataConfig,
    "train": TrainConfig, "eval": EvalConfig, "runtime": RuntimeConfig,
}


@dataclasses.dataclass(frozen=True)
class Config:
  """The whole training config (module docstring). Build it with `Config.from_config_dict`.

  Attributes:
    seed: model initialization seed.
    input_convention: input normalization applied on device (models/preprocessing.py):
      'torchvision' (RGB in 0-1, ImageNet mean/std; torchvision's weights), 'caffe' (BGR 0-255
      minus mean; detectron2's MSRA weights), 'caffe_fair' (FAIR's X-101). A converted checkpoint
      records its own; `init_from` checks that they agree.
    init_from: a converted checkpoint or a training run (`checkpoints.load_model`); '' trains from
      scratch.
    init_mode: 'backbone' (ImageNet weights) or 'model' (a whole detector).
  """

  seed: int = 0
  input_convention: str = _choice("torchvision", INPUT_CONVENTIONS)
  init_from: str = ""
  init_mode: str = _choice("backbone", INIT_MODES)
  model: retinanet_lib.RetinaNetConfig = retinanet_lib.RetinaNetConfig()
  anchors: anchor_lib.AnchorConfig = anchor_lib.AnchorConfig()
  matching: MatchingConfig = MatchingConfig()
  loss: LossConfig = LossConfig()
  data: data_config_lib.DataConfig = data_config_lib.DataConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  runtime: RuntimeConfig = RuntimeConfig()

  @classmethod
  def from_config_dict(cls, config) -> Config:
    """The typed config of an `ml_collections.ConfigDict` (or dict) with `default_config()`'s
    layout, its derived fields recomputed from their sources (`derive_fields`); raises
    `ConfigError` listing every problem of every section."""
    if isinstance(config, cls):
      return config
    values = copy.deepcopy(typed_config.as_dict(config))  # derive_fields edits it
    problems = typed_config.check_fields(cls, values, prefix="")
    if not problems:
      problems = derived.derive_fields(values)
    if problems:
      raise ConfigError(problems)
    sections = {}
    anchors = None
    for name, section_cls in SECTIONS.items():
      if name not in values:
        continue
      extra = None
      if name == "model":
        extra = {"num_anchors": (anchors or anchor_lib.AnchorConfig()).num_per_location}
      try:
        sections[name] = typed_config.from_mapping(section_cls, values[name], prefix=f"{name}.",
                                                   extra=extra)
      except ConfigError as e:
        problems += e.problems
      if name == "anchors" and name in sections:
        anchors = sections[name]
    if problems:
      raise ConfigError(problems)
    top = {k: v for k, v in values.items() if k not in SECTIONS}
    return cls(**top, **sections)

  def to_config_dict(self) -> ml_collections.ConfigDict:
    return typed_config.to_config_dict(self)

  def to_json(self) -> dict:
    """Every field but the runtime section (which never leaves the process), JSON-ready."""
    out = dataclasses.asdict(self)
    del out["runtime"]
    out["model"].pop("num_anchors")
    return out

  @classmethod
  def from_json(cls, obj: dict) -> Config:
    """From `to_json()`'s dict (a run's `config.json`); the runtime section takes its defaults."""
    return cls.from_config_dict(obj)

