"""models/convolution.py: the NHWC kernel-gradient forms, against PyTorch's float64 convolution."""

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jax import lax

from retinanet_jax.models import convolution
from retinanet_jax.models import retinanet

NHWC = ("NHWC", "HWIO", "NHWC")

# (input [B, H, W, C_in], kernel [kh, kw, C_in, C_out], stride, padding ((top, bottom), (left, right)))
CASES = {
    "1x1": ((2, 6, 5, 7), (1, 1, 7, 4), 1, ((0, 0), (0, 0))),
    "1x1 stride 2, odd size": ((2, 9, 7, 6), (1, 1, 6, 5), 2, ((0, 0), (0, 0))),
    "3x3 pad 1": ((2, 8, 6, 5), (3, 3, 5, 6), 1, ((1, 1), (1, 1))),
    "3x3 stride 2 pad 1, odd size": ((3, 11, 9, 4), (3, 3, 4, 7), 2, ((1, 1), (1, 1))),
    "3x3 stride 2, asymmetric (TF 'SAME')": ((1, 10, 8, 3), (3, 3, 3, 4), 2, ((0, 1), (0, 1))),
    "7x7 stride 2 pad 3 (the stem)": ((1, 13, 12, 3), (7, 7, 3, 5), 2, ((3, 3), (3, 3))),
    "3x3 no padding": ((2, 7, 7, 3), (3, 3, 3, 2), 1, ((0, 0), (0, 0))),
    "1x1 on a 1x1 map": ((4, 1, 1, 8), (1, 1, 8, 3), 1, ((0, 0), (0, 0))),
}


def _torch_reference(x, w, stride, padding, cotangent):
  """(output, dL/dx, dL/dw) in float64 with L = sum(conv(x, w) * cotangent), NHWC / HWIO."""
  (top, bottom), (left, right) = padding
  xt = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
  wt = torch.tensor(w.transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
  y = F.conv2d(F.pad(xt, (left, right, top, bottom)), wt, stride=stride)
  (y * torch.tensor(cotangent.transpose(0, 3, 1, 2), dtype=torch.float64)).sum().backward()
  return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
          wt.grad.numpy().transpose(2, 3, 1, 0))


def _ours(kernel_gradient, stride, padding):
  conv = convolution.conv_function(kernel_gradient)

  def loss(x, w, cotangent):
    y = conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    return jnp.sum(y * cotangent), y

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _close(actual, expected, rtol=2e-5):
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("kernel_gradient", convolution.KERNEL_GRADIENTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_pytorch_float64(case, kernel_gradient):
  x_shape, w_shape, stride, padding = CASES[case]
  rng = np.random.default_rng(zlib.crc32(case.encode()))
  x = rng.normal(size=x_shape).astype(np.float32)
  w = rng.normal(size=w_shape).astype(np.float32)
  expected_y, expected_dx, expected_dw = _torch_reference(x, w, stride, padding,
                                                          np.zeros((1, 1, 1, 1)))
  cotangent = rng.normal(size=expected_y.shape).astype(np.float32)
  _, expected_dx, expected_dw = _torch_reference(x, w, stride, padding, cotangent)
  (_, y), (dx, dw) = _ours(kernel_gradient, stride, padding)(x, w, cotangent)
  _close(y, expected_y)
  _close(dx, expected_dx)
  _close(dw, expected_dw)
  assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32 and dw.shape == w_shape


def test_gemm_kernel_gradient_golden():
  """By hand: a 3x3 image 1..9, a 2x2 kernel, no padding, dL/dy = 1 everywhere: dW[i, j] is the sum
  of the 2x2 window at (i, j): [[1+2+4+5, 2+3+5+6], [4+5+7+8, 5+6+8+9]]."""
  x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
  dw = jax.jit(functools.partial(convolution.gemm_kernel_gradient, w_shape=(2, 2, 1, 1),
                                 strides=(1, 1), padding=((0, 0), (0, 0))))(x, dy=jnp.ones((1, 2, 2, 1)))
  np.testing.assert_array_equal(dw[..., 0, 0], [[12.0, 16.0], [24.0, 28.0]])
  # Stride 2 with padding 1 on a 3x3 image: the output is 2x2 and tap (0, 0) reads the padded zeros
  # and x[1, 1] = 5 (positions (-1, -1), (-1, 1), (1, -1), (1, 1)).
  dw = jax.jit(functools.partial(convolution.gemm_kernel_gradient, w_shape=(3, 3, 1, 1),
                                 strides=(2, 2), padding=((1, 1), (1, 1))))(x, dy=jnp.ones((1, 2, 2, 1)))
  assert float(dw[0, 0, 0, 0]) == 5.0
  assert float(dw[1, 1, 0, 0]) == 1.0 + 3.0 + 7.0 + 9.0  # the centre tap reads the four corners


def test_folded_kernel_gradient_golden():
  """Two 3x3 images (1..9 and 10..18), a 2x2 kernel, no padding, dL/dy = 1: side by side the windows
  never straddle the two images, so dW[i, j] is the sum of both images' 2x2 windows at (i, j)."""
  x = jnp.arange(1.0, 19.0).reshape(2, 3, 3, 1)
  w = jnp.zeros((2, 2, 1, 1))
  dw = jax.jit(functools.partial(convolution.folded_kernel_gradient, padding=((0, 0), (0, 0))))(
      x, w, jnp.ones((2, 2, 2, 1)))
  first = np.array([[12.0, 16.0], [24.0, 28.0]])
  np.testing.assert_array_equal(dw[..., 0, 0], first + (first + 4 * 9))


@pytest.mark.parametrize("w_shape, stride, form", [((1, 1, 4, 4), 1, "gemm"), ((1, 1, 4, 4), 2, "gemm"),
                                                   ((3, 3, 4, 4), 2, "gemm"), ((3, 3, 4, 4), 1, "folded"),
                                                   ((7, 7, 4, 4), 1, "folded")])
def test_nhwc_form(w_shape, stride, form):
  assert convolution.nhwc_form(w_shape, (stride, stride)) == form


def test_bfloat16_gradients_and_float32_accumulation():
  """bfloat16 input and kernel (the model's dtype='bfloat16'): the kernel gradient is bfloat16 like
  the kernel, and with preferred_element_type=float32 (the head's predictor) the output is float32."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 9, 9, 8)).astype(np.float32)
  w = rng.normal(size=(3, 3, 8, 4)).astype(np.float32)
  results = {}
  for mode in ("xla", "nhwc"):
    conv = convolution.conv_function(mode)

    def loss(x, w, conv=conv):
      y = conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (2, 2), ((1, 1), (1, 1)),
               dimension_numbers=NHWC, preferred_element_type=jnp.float32)
      assert y.dtype == jnp.float32
      return jnp.sum(y ** 2)

    results[mode] = jax.jit(jax.grad(loss, argnums=1))(x, w)
  assert results["nhwc"].dtype == jnp.float32  # the cast back to float32 kernels
  _, _, expected = _torch_reference(x, w, 2, ((1, 1), (1, 1)),
                                    2 * _torch_reference(x, w, 2, ((1, 1), (1, 1)),
                                                         np.zeros((1, 1, 1, 1)))[0])
  for mode, dw in results.items():  # bfloat16 has 8 bits of mantissa
    _close(dw, expected, rtol=3e-2)
  _close(results["nhwc"], np.asarray(results["xla"], np.float64), rtol=2e-2)


@pytest.mark.parametrize("kwargs", [dict(feature_group_count=2), dict(rhs_dilation=(2, 2)),
                                    dict(lhs_dilation=(2, 2)), dict(padding=((-1, 1), (1, 1)))],
                         ids=["groups", "rhs dilation", "lhs dilation", "negative padding"])
def test_unsupported_calls_are_xla_itself(kwargs):
  """Grouped (ResNeXt), dilated or negatively padded convolutions take lax's path, gradients too."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  groups = kwargs.get("feature_group_count", 1)
  w = rng.normal(size=(3, 3, 4 // groups, 6)).astype(np.float32)
  padding = kwargs.pop("padding", ((1, 1), (1, 1)))

  def loss(conv, x, w):
    return jnp.sum(conv(x, w, (1, 1), padding, dimension_numbers=NHWC, **kwargs) ** 2)

  ours = jax.jit(jax.grad(functools.partial(loss, convolution.conv_function("nhwc")), argnums=(0, 1)))
  reference = jax.jit(jax.grad(functools.partial(loss, lax.conv_general_dilated), argnums=(0, 1)))
  for a, b in zip(ours(x, w), reference(x, w)):
    np.testing.assert_array_equal(a, b)


def test_string_padding():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(1, 7, 9, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
  for padding in ("SAME", "VALID"):
    def loss(conv, x, w):
      return jnp.sum(conv(x, w, (2, 2), padding, dimension_numbers=NHWC) ** 2)

    ours = jax.jit(jax.grad(functools.partial(loss, convolution.conv_function("nhwc")), argnums=1))
    reference = jax.jit(jax.grad(functools.partial(loss, lax.conv_general_dilated), argnums=1))
    _close(ours(x, w), np.asarray(reference(x, w), np.float64))


def _kernel_gradient_windows(mode, w_shape, stride):
  """The windows of the convolutions in the optimized HLO of d/dw (a [2, 16, 16, C_in] input) that
  produce a kernel-shaped result `[C_in, kh, kw, C_out]`: XLA's weight-gradient convolutions. The
  window is the output gradient's spatial size: 16x16 batched, 16x34 (2 x 18 - 2) folded."""
  conv = convolution.conv_function(mode)
  kh, kw, c_in, c_out = w_shape
  pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, (stride, stride), pad,
                                                     dimension_numbers=NHWC) ** 2), argnums=1))
  text = grad.lower(jnp.ones((2, 16, 16, c_in)), jnp.ones(w_shape)).compile().as_text()
  shape = rf"f32\[{c_in},{kh},{kw},{c_out}\]"
  return re.findall(shape + r"\{[\d,]*\} convolution\([^\n]*window=\{size=(\d+x\d+)", text)


@pytest.mark.parametrize("w_shape, stride, nhwc_windows", [((1, 1, 8, 16), 1, []),
                                                            ((3, 3, 8, 16), 2, []),
                                                            ((3, 3, 8, 16), 1, ["16x34"])])
def test_auto_lowers_the_nhwc_forms_on_the_cpu(w_shape, stride, nhwc_windows):
  """'auto' is 'nhwc' when lowered for the CPU: no batched weight-gradient convolution is left; the
  1x1 and strided ones are GEMMs, the 3x3 stride-1 one runs on the folded batch."""
  assert len(_kernel_gradient_windows("xla", w_shape, stride)) == 1
  assert _kernel_gradient_windows("nhwc", w_shape, stride) == nhwc_windows
  assert _kernel_gradient_windows("auto", w_shape, stride) == nhwc_windows


@pytest.mark.parametrize("platform, nhwc", [("cpu", True), ("cuda", False), ("tpu", False),
                                             ("rocm", False)])
def test_auto_keeps_xla_kernel_gradients_on_accelerators(platform, nhwc):
  """The program of a 1x1 convolution's kernel gradient, exported (StableHLO) for each platform: 'auto'
  is the GEMM (a dot_general, one convolution: the forward) only for the CPU, XLA's weight-gradient
  convolution (two convolutions, no dot) for GPUs and TPUs; 'nhwc' is the GEMM everywhere."""
  def program(mode):
    conv = convolution.conv_function(mode)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, (1, 1), ((0, 0), (0, 0)),
                                                      dimension_numbers=NHWC) ** 2), argnums=1))
    exported = jax.export.export(grad, platforms=(platform,))(
        jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32), jax.ShapeDtypeStruct((1, 1, 4, 6), jnp.float32))
    text = exported.mlir_module()
    return "dot_general" in text, text.count("stablehlo.convolution")

  assert program("auto") == ((True, 1) if nhwc else (False, 2))
  assert program("nhwc") == (True, 1)
  assert program("xla") == (False, 2)


def test_invalid_mode_is_an_error_naming_the_field():
  with pytest.raises(ValueError, match="conv_kernel_gradient must be one of"):
    convolution.conv_function("cudnn")
  with pytest.raises(ValueError, match="conv_kernel_gradient"):
    retinanet.RetinaNet(retinanet.RetinaNetConfig(backbone="resnet18"), kernel_gradient="fast",
                        rngs=nnx.Rngs(0))


def test_retinanet_gradients_agree_across_modes():
  """A small RetinaNet (ResNet-18, frozen BN, stem + res2 frozen): every parameter's gradient is the
  same with the three kernel-gradient modes (float32 summation order aside)."""
  rng = np.random.default_rng(6)
  images = jnp.asarray(rng.normal(size=(2, 64, 80, 3)).astype(np.float32))
  grads = {}
  for mode in convolution.KERNEL_GRADIENTS:
    config = retinanet.RetinaNetConfig(backbone="resnet18", fpn_channels=16, num_classes=3)
    model = retinanet.build_model(config, rngs=nnx.Rngs(0), kernel_gradient=mode)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, graphdef=graphdef):
      cls_logits, box_deltas = nnx.merge(graphdef, params, rest)(images)
      return jnp.sum(jnp.sin(cls_logits)) + jnp.sum(box_deltas ** 2)

    grads[mode] = jax.jit(jax.grad(loss))(params, rest)
  reference = jax.tree.leaves(grads["xla"])
  assert len(reference) > 20
  for mode in ("auto", "nhwc"):
    for a, b in zip(jax.tree.leaves(grads[mode]), reference):
      _close(a, np.asarray(b, np.float64), rtol=1e-4)
