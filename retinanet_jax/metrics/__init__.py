"""Scores of detections against ground truth, on the host, with no model and no JAX: COCO AP with
pycocotools or faster-coco-eval (`coco`), the pedestrian log-average miss rate (`miss_rate`) and
object counting (`counting`). `retinanet_jax.evaluation` runs a model over a dataset and scores it
with these."""
