"""Export a trained or converted RetinaNet with normalization, network, decoding and NMS inside.

    python scripts/export.py --checkpoint=weights/tv_v1 --format=stablehlo --output=export/tv_v1_hlo \
        --image_size=800,1344
    python scripts/export.py --checkpoint=runs/r50 --format=savedmodel --output=export/r50_tf \
        --image_size=512,512 --batch_size=1
    python scripts/export.py --checkpoint=runs/r50 --format=onnx --output=export/r50_onnx \
        --image_size=512,512 --batch_size=1

The artifact takes uint8 images `[B, H, W, 3]` (each image at the top-left of the H x W canvas) and
their valid sizes int32 `[B, 2]`, and returns boxes `[B, D, 4]` in the canvas' pixels, scores, class
indices and a validity mask (retinanet_jax/deploy/export.py). `signature.json`, `description.json` and
`labels.json` are written next to it; `signature.json`'s `input_resize` says how to resize a photo into
the canvas and map the boxes back (a model trained with `data.mode='fixed'`: stretch to S x S, boxes
back per axis). --output must be new or empty: nothing is overwritten.
--image_size: default 800,1344, or S,S for a 'fixed' model (the side it was trained at).
--batch_size: 'dynamic' (StableHLO's default: any batch) or N (SavedModel and ONNX need N; default 1).
ONNX needs jax2onnx and onnx (docs/deploy.md); its NMS is ONNX's NonMaxSuppression op.
"""

from retinanet_jax.runtime import console  # (imports no JAX, no TensorFlow)

console.quiet_native_logs()

from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from retinanet_jax.runtime import errors  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted weights, a training workdir or one step's folder.")
flags.DEFINE_enum("format", None, ["stablehlo", "savedmodel", "onnx"], "Artifact format.")
flags.DEFINE_string("output", None, "New or empty directory to write.")
flags.DEFINE_list("image_size", ["800", "1344"], "H,W of the input canvas (fixed in the artifact; "
                  "default for a model trained with data.mode='fixed': S,S, its side).")
flags.DEFINE_string("batch_size", None, "N or 'dynamic' (default: dynamic for stablehlo, 1 for "
                    "savedmodel and onnx).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype of the network "
                  "(decoding and NMS stay float32).")
flags.DEFINE_float("score_threshold", 0.05, "Keep detections scoring above this.")
flags.DEFINE_integer("max_detections", 100, "D, detections per image.")
flags.DEFINE_float("nms_threshold", 0.5, "Class-wise NMS IoU threshold.")
flags.DEFINE_integer("topk_candidates", 1000, "Candidates per pyramid level before NMS.")
flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logging.")
flags.mark_flags_as_required(["checkpoint", "format", "output"])


def parse_batch_size(value, fmt: str):
  if value is None:
    return None if fmt == "stablehlo" else 1
  if value == "dynamic":
    return None
  if not value.isdigit() or int(value) < 1:
    raise app.UsageError(f"--batch_size must be a positive integer or 'dynamic', got {value!r}")
  return int(value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  console.setup(verbose=FLAGS.verbose)
  if len(FLAGS.image_size) != 2 or not all(s.isdigit() for s in FLAGS.image_size):
    raise app.UsageError(f"--image_size must be H,W, got {','.join(FLAGS.image_size)}")
  from retinanet_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from retinanet_jax.deploy import export  # pylint: disable=import-outside-toplevel

  try:
    description = checkpoints.locate(FLAGS.checkpoint).description
    image_size = (tuple(int(s) for s in FLAGS.image_size) if FLAGS["image_size"].present
                  else export.default_image_size(description))
    spec = export.ExportSpec(image_size=image_size,
                             batch_size=parse_batch_size(FLAGS.batch_size, FLAGS.format),
                             score_threshold=FLAGS.score_threshold,
                             topk_candidates=FLAGS.topk_candidates,
                             nms_threshold=FLAGS.nms_threshold, max_detections=FLAGS.max_detections)
    export.check_request(FLAGS.output, fmt=FLAGS.format, spec=spec, dtype=FLAGS.dtype,
                         description=description)
    loaded = checkpoints.load_model(FLAGS.checkpoint, dtype=FLAGS.dtype)
    export.export_model(loaded, FLAGS.output, fmt=FLAGS.format, spec=spec, dtype=FLAGS.dtype)
  except (ValueError, FileExistsError, ImportError) as e:
    if errors.exit_code_of(e) is not None:  # a checkpoint (4) or an existing output (6)
      raise
    raise app.UsageError(str(e)) from None
  resize = export.input_resize(description)
  fixed = (f"; stretch each photo to {resize['image_size'][0]} x {resize['image_size'][1]}, boxes "
           f"back per axis (signature.json)" if resize["mode"] == "fixed" else "")
  print(f"wrote {FLAGS.output} ({FLAGS.format}, input uint8 {spec.signature()['inputs']['images']['shape']}"
        f"{fixed})")


if __name__ == "__main__":
  errors.run(main)
