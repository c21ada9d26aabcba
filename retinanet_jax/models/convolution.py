"""The network's 2-D convolution, with a kernel gradient that keeps XLA:CPU off its slow layouts.

Forward, and the gradient with respect to the input, are always XLA's own (`lax.conv_general_dilated`
and its transpose). `kernel_gradient` (one of `KERNEL_GRADIENTS`) chooses how training computes the
gradient with respect to the kernel:

  * `xla`: XLA's weight-gradient convolution. On the CPU, XLA runs it as a convolution whose "batch" is
    the input channels and whose "features" are the images, so it first transposes the activation
    `[B, H, W, C_in]` to `[C_in, H, W, B]` and the output gradient to `[H', W', B, C_out]`: copies whose
    minor dimension is the batch (2 images per device on a CPU), measured at 0.3 GB/s, fused into and
    duplicated over the elementwise operations that produce those tensors.
  * `nhwc`: forms that read NHWC rows as they are:
      - 1x1 kernels and strided convolutions (`gemm_kernel_gradient`): `dW[i, j] = X_ij^T dY`, one GEMM
        per kernel tap `(i, j)`, where `X_ij` `[B * H' * W', C_in]` is the strided view of the padded
        input that the tap reads and `dY` is `[B * H' * W', C_out]`. No layout transposes at all.
      - stride-1 kernels larger than 1x1 (`folded_kernel_gradient`): XLA's weight-gradient convolution
        of one image, the batch's padded images side by side along the width (zero gradient columns
        between them keep the windows apart). With a batch of one XLA's transposes are plain
        `[H W, C] -> [C, H W]` ones, and its kernel is a GEMM with `K = H' x B W_p` instead of a 2-wide
        contraction per tap.
  * `auto` (the default): `nhwc` on the CPU, `xla` on every other platform (GPUs and TPUs have native
    weight-gradient kernels and no such layout penalty). The platform is the one the program is
    lowered for (`lax.platform_dependent`).

On the R50-FPN training step at 512x512, batch 2, `nhwc` takes 18% less time than `xla`
(docs/benchmarks.md, "Closing XLA's CPU gap"). The modes give the same gradients up to float32
summation order (tests/models/test_convolution.py checks each against PyTorch's float64 gradients).

Shapes: NHWC input `[B, H, W, C_in]`, HWIO kernel `[kh, kw, C_in, C_out]`, NHWC output
`[B, H', W', C_out]`, `H' = (H + pad_top + pad_bottom - kh) // stride + 1`. The NHWC forms cover
`feature_group_count=1`, no dilation, non-negative padding and default precision; any other call
(ResNeXt's grouped 3x3s, say) is `lax.conv_general_dilated` itself, gradient included.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

KERNEL_GRADIENTS = ("auto", "xla", "nhwc")

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


def folded_kernel_gradient(x, w, dy, *, padding: tuple[tuple[int, int], tuple[int, int]],
                           preferred_element_type=None):
  """`dL/dW` of a stride-1 `conv(x, W)` given `dy`, as XLA's weight-gradient convolution of one image:
  the `B` padded images side by side, `[1, H_p, B * W_p, C_in]`, and their output gradients side by
  side with `kw - 1` zero columns after each, `[1, H', B * W_p - kw + 1, C_out]`. The zero columns
  are where a window would straddle two images, so the sum is exactly the batched one; with one image
  XLA's layout transposes are plain `[H W, C] -> [C, H W]` ones instead of moving the batch minor."""
  kw = w.shape[1]
  batch, out_h, out_w, c_out = dy.shape
  (top, bottom), (left, right) = padding
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  _, h_p, w_p, c_in = padded.shape
  side_by_side = padded.transpose(1, 0, 2, 3).reshape(1, h_p, batch * w_p, c_in)
  gaps = jnp.pad(dy, ((0, 0), (0, 0), (0, w_p - out_w), (0, 0)))
  dy_side_by_side = gaps.transpose(1, 0, 2, 3).reshape(1, out_h, batch * w_p, c_out)
  dy_side_by_side = dy_side_by_side[:, :, :batch * w_p - (kw - 1)]
  return _xla_kernel_gradient(side_by_side, w, dy_side_by_side, (1, 1), ((0, 0), (0, 0)),
                              preferred_element_type)


def _xla_kernel_gradient(x, w, dy, strides, padding, preferred_element_type):
  _, pullback = jax.vjp(lambda w_: _forward(x, w_, strides, padding, preferred_element_type), w)
  return pullback(dy)[0]


def nhwc_form(w_shape, strides) -> str:
  """The NHWC form of one convolution's kernel gradient: 'gemm' (`gemm_kernel_gradient`) for 1x1
  kernels and strided convolutions, 'folded' (`folded_kernel_gradient`) for the rest."""
  if tuple(w_shape[:2]) == (1, 1) or tuple(strides) != (1, 1):
    return "gemm"
  return "folded"


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
  if nhwc_form(w.shape, strides) == "gemm":
    nhwc = lambda: gemm_kernel_gradient(x, w.shape, dy, strides=strides,
                                        padding=padding).astype(w.dtype)
  else:
    nhwc = lambda: folded_kernel_gradient(x, w, dy, padding=padding,
                                          preferred_element_type=preferred_element_type)
  if kernel_gradient == "nhwc":
    dw = nhwc()
  else:  # auto: the NHWC forms on the CPU only
    xla = lambda: _xla_kernel_gradient(x, w, dy, strides, padding, preferred_element_type)
    dw = lax.platform_dependent(cpu=nhwc, default=xla)
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
  if not supported or kernel_gradient == "xla":
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
