"""Deployment: a detector exported with its pre- and post-processing inside, as StableHLO, a
TensorFlow SavedModel or ONNX (`export.export_model`; scripts/export.py), runnable without this
project's code (docs/deploy.md). `function` is the exported function, `stablehlo` and `onnx_format`
the formats."""
