"""retinanet_jax: RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection") in JAX/Flax NNX.

The notebook API: pure functions, usable under `jax.jit` / `jax.vmap` / `jax.grad`:

    from retinanet_jax import (sigmoid_focal_loss, generate_anchors, AnchorConfig, match_anchors,
                               label_anchors, BoxCoder, pairwise_iou, postprocess_detections,
                               retinanet_loss)

The training layer around it: `config` (typed config sections), `train_state.create_train_state`,
`train_step`, `checkpoints` (`load_model`), `evaluation`, `train.train_and_evaluate`.
"""

from retinanet_jax.anchors import AnchorConfig, AnchorSet, generate_anchors
from retinanet_jax.boxes import (BoxCoder, box_area, clip_boxes, cxcywh_to_xyxy, pairwise_giou,
                                 pairwise_iou, xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh,
                                 xyxy_to_yxyx_normalized, yxyx_normalized_to_xyxy)
from retinanet_jax.labeling import AnchorTargets, label_anchors
from retinanet_jax.losses import (LossOutput, LossSums, giou_loss, huber_loss, l1_loss,
                                  retinanet_loss, retinanet_losses, sigmoid_focal_loss,
                                  sigmoid_focal_loss_from_labels, smooth_l1_loss)
from retinanet_jax.matching import (IGNORE, NEGATIVE, POSITIVE, MatchResult, batch_match_anchors,
                                    classification_targets, match_anchors)
from retinanet_jax.postprocess import (Detections, class_wise_nms, postprocess_detections,
                                       tiled_class_wise_nms)

__all__ = [
    "AnchorConfig", "AnchorSet", "AnchorTargets", "BoxCoder", "Detections", "IGNORE", "LossOutput",
    "LossSums", "MatchResult",
    "NEGATIVE", "POSITIVE", "batch_match_anchors", "box_area", "class_wise_nms",
    "classification_targets", "clip_boxes", "cxcywh_to_xyxy", "generate_anchors", "giou_loss",
    "huber_loss", "l1_loss", "label_anchors", "match_anchors", "pairwise_giou", "pairwise_iou",
    "postprocess_detections", "retinanet_loss", "retinanet_losses", "sigmoid_focal_loss",
    "sigmoid_focal_loss_from_labels", "smooth_l1_loss", "tiled_class_wise_nms", "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh", "xyxy_to_yxyx_normalized", "yxyx_normalized_to_xyxy",
]
