"""StableHLO (`jax.export`) and TensorFlow SavedModel (`jax2tf`) forms of the exported function
(deploy/function.py)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from retinanet_jax.deploy.function import (FIXED_BATCH_MESSAGES, ExportSpec, detection_function,
                                           input_specs)

STABLEHLO_FILE, SAVED_MODEL_DIR = "model.stablehlo", "saved_model"


def export_stablehlo(loaded, *, spec: ExportSpec) -> jax.export.Exported:
  """The `jax.export.Exported` of the detection function, weights inlined as constants."""
  detect, state = detection_function(loaded, spec=spec)
  state = jax.tree.map(jnp.asarray, state)
  return jax.export.export(jax.jit(lambda images, image_hw: detect(state, images, image_hw)))(
      *input_specs(spec))


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
  """Serializes StableHLO for the consumer 12 weeks old instead of 4 while active.

  jax 0.10.2 writes StableHLO 1.15.0 (`WEEK_4`), in which `chlo.top_k` becomes a `vhlo.composite_v2`
  that TensorFlow 2.21's `XlaCallModule` (StableHLO 1.13.7) cannot read ("unregistered operation
  'vhlo.composite_v2'"); `WEEK_12` is 1.13.7. jax offers no public switch, so this replaces the
  private `jax._src.export._export._module_to_bytecode` for the duration of one conversion."""
  # jax's private modules, touched only while this conversion runs:
  from jax._src.export import _export  # pylint: disable=import-outside-toplevel
  from jax._src.lib import _jax  # private, as above  # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir.dialects import hlo  # private, as above  # pylint: disable=import-outside-toplevel

  original = _export._module_to_bytecode  # pylint: disable=protected-access

  def module_to_bytecode(module):
    target = hlo.get_version_from_compatibility_requirement(
        hlo.StablehloCompatibilityRequirement.WEEK_12)
    return _jax.mlir.serialize_portable_artifact(module, target,
                                                 jax.extend.backend.get_backend().serialize_with_sdy)

  _export._module_to_bytecode = module_to_bytecode  # pylint: disable=protected-access
  try:
    yield
  finally:
    _export._module_to_bytecode = original  # pylint: disable=protected-access


def export_saved_model(loaded, path: str, *, spec: ExportSpec) -> None:
  """A SavedModel at `path` with the signature 'serving_default' (inputs `images`, `image_hw`;
  outputs `boxes`, `scores`, `classes`, `valid`), weights as `tf.Variable`s, through `jax2tf`
  (native serialization: the same StableHLO inside an `XlaCallModule` op)."""
  if spec.batch_size is None:
    raise ValueError(FIXED_BATCH_MESSAGES["savedmodel"])
  import tensorflow as tf  # heavy, and only this format needs it  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # imports TensorFlow  # pylint: disable=import-outside-toplevel

  detect, state = detection_function(loaded, spec=spec)
  leaves, treedef = jax.tree.flatten(state)
  height, width = spec.image_size
  converted = jax2tf.convert(
      lambda flat, images, image_hw: detect(jax.tree.unflatten(treedef, flat), images, image_hw),
      with_gradient=False)
  module = tf.Module()
  module.variables_list = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]
  tf_batch = spec.batch_size

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec((tf_batch, height, width, 3), tf.uint8, name="images"),
      tf.TensorSpec((tf_batch, 2), tf.int32, name="image_hw")])
  def serve(images, image_hw):
    images = tf.ensure_shape(images, (tf_batch, height, width, 3), name="images")
    image_hw = tf.ensure_shape(image_hw, (tf_batch, 2), name="image_hw")
    return converted(module.variables_list, images, image_hw)

  module.serve = serve
  with _stablehlo_for_tensorflow():
    tf.saved_model.save(module, path, signatures={"serving_default": serve})
