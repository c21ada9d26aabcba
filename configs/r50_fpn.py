"""RetinaNet R-50-FPN on COCO 2017: the paper's and detectron2's "1x" schedule. The base config.

    python scripts/train.py --config=configs/r50_fpn.py --workdir=runs/r50
    python scripts/train.py --config=configs/r50_fpn.py:smoke --workdir=/tmp/smoke  # a few tiny steps
    python scripts/train.py --config=configs/r50_fpn.py --config.train.batch_size=8  # leaf override

Every default that differs between the reference implementations is a named field below, with who
uses which value. Start from ImageNet weights as the paper does: convert them once with
scripts/convert_weights.py and pass `--config.init_from=DIR` (`init_mode='backbone'`).
"""

import ml_collections

from retinanet_jax import xla_flags
from retinanet_jax.data import config as data_config_lib

VARIANTS = ("", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Input normalization applied on device (models/preprocessing.py): 'torchvision' (RGB in 0-1,
  # ImageNet mean/std; torchvision's weights) or 'caffe' (BGR 0-255 minus mean; detectron2's MSRA
  # weights). A converted checkpoint records its own; init_from checks that they agree.
  c.input_convention = "torchvision"
  # A converted checkpoint (scripts/convert_weights.py); '' trains from scratch.
  c.init_from = ""
  c.init_mode = "backbone"  # 'backbone' (ImageNet weights) or 'model' (a whole detector)

  # --- Network (models/retinanet.py RetinaNetConfig) -------------------------------------------
  c.model = ml_collections.ConfigDict(dict(
      backbone="resnet50",
      norm="frozen_bn",       # paper, detectron2, torchvision v1/v2: frozen BN from ImageNet
      freeze_at=2,            # detectron2: stem + res2 frozen
      stride_in_1x1=False,    # True for MSRA/caffe weights (detectron2's R-50/R-101)
      norm_epsilon=1e-5,
      norm_axis_name="data",  # sync_bn statistics across the data-parallel axis
      fpn_channels=256,
      p6_input="c5",          # paper, detectron2, torchvision v2; 'p5': torchvision v1, TF
      head_norm="none",       # torchvision v2: 'group_norm'
      head_num_convs=4,
      num_classes=80,
      prior_prob=0.01,
      dtype="float32",        # 'bfloat16' compute, float32 parameters
      # Kernel gradients in training (models/convolution.py): 'auto' = 'nhwc' on the CPU (forms that
      # avoid XLA:CPU's batch-minor transposes, -18% step time), 'xla' elsewhere; 'xla'; 'nhwc'.
      # Same gradients; only the speed differs (docs/benchmarks.md).
      conv_kernel_gradient="auto",
  ))

  # --- Anchors (anchors.py) --------------------------------------------------------------------
  c.anchors = ml_collections.ConfigDict(dict(
      min_level=3, max_level=7, num_scales=3, aspect_ratios=(0.5, 1.0, 2.0), anchor_scale=4.0,
      convention="torchvision",  # 'detectron2' (float sizes, offset 0), 'tf' (centres at stride/2)
  ))

  # --- Loss (losses.py) ------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict(dict(
      alpha=0.25, gamma=2.0,
      box_loss="smooth_l1",     # paper, detectron2 (beta 0.1); torchvision v1 'l1', v2 'giou', TF 'huber'
      smooth_l1_beta=0.1, huber_delta=0.1, box_loss_weight=1.0,
      positive_threshold=0.5, negative_threshold=0.4,
      low_quality="ties",       # torchvision/detectron2; 'force': TF/TPU; 'none'
      normalizer="batch",       # positives in the global batch; 'ema': detectron2's EMA
      normalizer_momentum=0.9, normalizer_init=100.0,
  ))

  # --- Data (retinanet_jax/data/config.py documents every field) -------------------------------
  c.data = data_config_lib.default_data_config()

  # --- Optimization ----------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict(dict(
      batch_size=16,            # global, over all devices and hosts
      steps=90_000,
      optimizer="sgd",          # 'adamw' for the torchvision v2 recipe
      base_lr=0.01,             # per 16 images (scaled linearly with batch_size)
      momentum=0.9,
      weight_decay=1e-4,
      schedule="step",          # or 'cosine'
      decay_steps=(60_000, 80_000),
      decay_factor=0.1,
      warmup_steps=1000,
      warmup_factor=0.001,
      grad_clip_norm=0.0,       # 0: off
      grad_reduction="psum",    # 'ordered': sum in device order on any layout (collectives.py)
      donate_state="auto",      # 'auto': donate the state to the step except on the CPU (train.py)
      log_every=20,
      check_finite_every=1,     # host check of the non-finite guard (a device sync)
      checkpoint_every=5000,
      keep_checkpoints=3,
      eval_every=0,             # 0: only at the end
  ))

  # --- Evaluation (postprocess.py) -------------------------------------------------------------
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=8, score_threshold=0.05, topk_candidates=1000, nms_threshold=0.5,
      max_detections=100, at_end=True,
      num_images_png=8,         # a PNG of this many validation images with detections
      png_score=0.3,
  ))

  # --- Process settings, applied by scripts/train.py before JAX starts ---------------------------
  # XLA flags for the CPU backend (GPU and TPU backends ignore --xla_cpu_* flags): the measured best
  # set, retinanet_jax/xla_flags.py (-20% CPU time per training step, docs/benchmarks.md). A flag of
  # the same name already in $XLA_FLAGS wins; '' adds none.
  c.xla_flags_cpu = " ".join(xla_flags.CPU_FLAGS)
  # JAX's persistent compilation cache, so that a resumed or restarted run loads its compiled steps
  # instead of compiling them again (640x640 training step: compile 8.8 s -> 1.7 s on CPU).
  # '{workdir}' stands for --workdir; '' turns it off; $JAX_COMPILATION_CACHE_DIR, if set, wins.
  c.compilation_cache_dir = "{workdir}/compilation_cache"

  return apply_variant(c, arg)


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; expected one of {VARIANTS}")
  if arg == "smoke":  # a couple of tiny steps: checks that everything runs
    c.data.train_min_size_range = (128, 128)
    c.data.eval_min_size = 128
    c.data.max_size = 128
    c.data.eval_split = "validation[:8]"
    c.train.batch_size = 4
    c.train.steps = 2
    c.train.warmup_steps = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.eval.batch_size = 4
    c.eval.num_images_png = 2
  return c
