"""The network's 2-D convolution, whose kernel gradient can be computed as GEMMs over NHWC rows.

Forward, and the gradient with respect to the input, are always XLA's own (`lax.conv_general_dilated`
and its transpose). What `kernel_gradient` (one of `KERNEL_GRADIENTS`) changes is how the gradient with
respect to the kernel is computed in training:

  * `xla`: XLA's weight-gradient convolution. On the CPU, XLA runs it as a convolution whose "batch" is
    the input channels and whose "features" are the images, so it first transposes the activation
    `[B, H, W, C_in]` and the output gradient `[B, H', W', C_out]` to layouts whose minor dimension is
    the batch (2 images on a CPU: 0.3 GB/s copies), fused into and duplicated over the elementwise
    operations that produce them.
  * `gemm`: `dW[i, j] = X_ij^T dY` for each kernel tap `(i, j)`, where `X_ij` is the strided view of
    the padded input that tap `(i, j)` reads, `[B * H' * W', C_in]`, and `dY` is `[B * H' * W', C_out]`:
    one GEMM per tap over rows that are already contiguous in NHWC, with no layout transposes. For a 1x1
    kernel that is a single GEMM (`X^T dY`, after a strided slice when the stride is 2).
  * `auto` (the default): `gemm` on the CPU for 1x1 kernels and for strided convolutions, where it is
    measured faster than XLA's (docs/benchmarks.md, "Closing XLA's CPU gap"), XLA's weight-gradient
    convolution for the rest (3x3 stride 1, where XLA's Eigen kernel beats `C_in`-wide GEMMs on the
    shifted views) and on every other platform (GPUs and TPUs have native weight-gradient kernels).
    The platform is the one the program is lowered for (`lax.platform_dependent`).

All three give the same gradients up to float32 summation order (tests/models/test_convolution.py
checks each against PyTorch's float64 convolution gradients).

Shapes: NHWC input `[B, H, W, C_in]`, HWIO kernel `[kh, kw, C_in, C_out]`, NHWC output
`[B, H', W', C_out]`, `H' = (H + pad_top + pad_bottom - kh) // stride + 1`. The GEMM form covers
`feature_group_count=1` (no grouped convolutions), no dilation and non-negative padding; anything else
(ResNeXt's grouped 3x3s, say) uses XLA's gradient whatever `kernel_gradient` says.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

KERNEL_GRADIENTS = ("auto", "xla", "gemm")

_NHWC = ("NHWC", "HWIO", "NHWC")


def check_kernel_gradient(kernel_gradient: str) -> str:
  if kernel_gradient not in KERNEL_GRADIENTS:
    raise ValueError(f"conv_kernel_gradient must be one of {KERNEL_GRADIENTS}, got {kernel_gradient!r}")
  return kernel_gradient


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:  # lax's default is NCHW
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return (tuple(dimension_numbers.lhs_spec), tuple(dimension_numbers.rhs_spec),
            tuple(dimension_numbers.out_spec)) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def _forward(x, w, strides, padding, preferred_element_type):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  preferred_element_type=preferred_element_type)


def gemm_kernel_gradient(x, w_shape: Sequence[int], dy, *, strides: tuple[int, int],
                         padding: tuple[tuple[int, int], tuple[int, int]]):
  """`dL/dW [kh, kw, C_in, C_out]` (float32) of `conv(x, W)` given `dy = dL/dconv`, as one GEMM
  `X_ij^T dY` per kernel tap (module docstring). `x` is `[B, H, W, C_in]`, `dy` `[B, H', W', C_out]`;
  padding must be non-negative."""
  kh, kw, c_in, c_out = w_shape
  batch, out_h, out_w, _ = dy.shape
  (s_h, s_w), ((top, bottom), (left, right)) = strides, padding
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  rows = dy.reshape(-1, c_out)

  def tap(i, j):  # [B * H' * W', C_in]: the inputs that kernel tap (i, j) multiplies
    view = lax.slice(padded, (0, i, j, 0),
                     (batch, i + s_h * (out_h - 1) + 1, j + s_w * (out_w - 1) + 1, c_in),
                     (1, s_h, s_w, 1))
    return lax.dot_general(view.reshape(-1, c_in), rows, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)

  return jnp.stack([tap(i, j) for i in range(kh) for j in range(kw)]).reshape(kh, kw, c_in, c_out)


def _xla_kernel_gradient(x, w, dy, strides, padding, preferred_element_type):
  _, pullback = jax.vjp(lambda w_: _forward(x, w_, strides, padding, preferred_element_type), w)
  return pullback(dy)[0]


def _uses_gemm(kernel_gradient: str, w_shape, strides) -> bool:
  """Static part of the choice: whether this convolution takes the GEMM form where allowed."""
  if kernel_gradient == "gemm":
    return True
  if kernel_gradient == "xla":
    return False
  return tuple(w_shape[:2]) == (1, 1) or tuple(strides) != (1, 1)  # auto, on the CPU


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, preferred_element_type, kernel_gradient):
  return _forward(x, w, strides, padding, preferred_element_type)


def _conv_fwd(x, w, strides, padding, preferred_element_type, kernel_gradient):
  return _forward(x, w, strides, padding, preferred_element_type), (x, w)


def _conv_bwd(strides, padding, preferred_element_type, kernel_gradient, residuals, dy):
  x, w = residuals
  _, input_pullback = jax.vjp(lambda x_: _forward(x_, w, strides, padding, preferred_element_type),
                              x)
  dx = input_pullback(dy)[0]
  gemm = lambda: gemm_kernel_gradient(x, w.shape, dy, strides=strides,
                                      padding=padding).astype(w.dtype)
  xla = lambda: _xla_kernel_gradient(x, w, dy, strides, padding, preferred_element_type)
  if kernel_gradient == "gemm":
    dw = gemm()
  else:  # auto: the GEMM form on the CPU only
    dw = lax.platform_dependent(cpu=gemm, default=xla)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None, *,
                         kernel_gradient: str = "auto"):
  """`lax.conv_general_dilated` (same arguments and result) whose kernel gradient follows
  `kernel_gradient` (module docstring). Calls it supports: NHWC/HWIO/NHWC dimension numbers, explicit
  non-negative or 'SAME'/'VALID' padding, no dilation, one group, default precision and sharding; any
  other call is `lax.conv_general_dilated` itself."""
  check_kernel_gradient(kernel_gradient)
  if isinstance(padding, str) and padding in ("SAME", "VALID") and _is_nhwc(dimension_numbers):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  supported = (
      _is_nhwc(dimension_numbers) and not isinstance(padding, str)
      and all(p >= 0 for pair in padding for p in pair)
      and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and feature_group_count == 1 and batch_group_count == 1 and precision is None
      and out_sharding is None and lhs.ndim == 4)
  strides = tuple(int(s) for s in window_strides)
  if not supported or not _uses_gemm(kernel_gradient, rhs.shape, strides):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type,
                                    out_sharding=out_sharding)
  padding = tuple((int(a), int(b)) for a, b in padding)
  return _conv(lhs, rhs, strides, padding, preferred_element_type, kernel_gradient)


def conv_function(kernel_gradient: str):
  """The `conv_general_dilated` to give `nnx.Conv` for `kernel_gradient` (one of
  `KERNEL_GRADIENTS`)."""
  check_kernel_gradient(kernel_gradient)
  if kernel_gradient == "xla":
    return lax.conv_general_dilated
  return functools.partial(conv_general_dilated, kernel_gradient=kernel_gradient)
