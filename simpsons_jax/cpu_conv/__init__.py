"""Convolutions on x86 CPUs through oneDNN, the library TensorFlow runs there.

XLA:CPU's convolutions, and their kernel gradients above all, run slower than
oneDNN's on AVX-512 CPUs (docs/performance.md measures them; oneDNN picks its
kernels for the CPU at run time). `onednn_conv.cc`, built by `pip install`
into `_onednn` (loaded and called by `library`), wraps oneDNN's forward,
input-gradient and kernel-gradient convolutions and its matrix product as XLA
FFI handlers; `library` ties each forward pass to its gradients with a
`jax.custom_vjp`. Here are the drop-ins that decide where they run:
`conv_general_dilated` for `lax.conv_general_dilated`, `dot_general` for
`lax.dot_general`, and `conv_relu_pool`, the notebook network's block
(conv + bias, ReLU, 2x2 max pool) fused.

It computes the same function on the same parameters (equal to `lax` within
float32 rounding, tested), so checkpoints move freely between the two paths.
Where the CPU has bfloat16 dot products (AVX512_BF16, AMX: `bfloat16()`), the
convolutions can round their operands to bfloat16 and accumulate and return
float32 (`bfloat16=True`), the plain formulation of the rounded operands
within float32 rounding (tested). Convolutions it does not handle (other
dtypes, dilation, groups, layouts) go to `lax.conv_general_dilated`
unchanged. `available()` says whether the kernels loaded and compute the
right values here (a self-check against the plain formulation,
`self_check.py`, run once), and why not where they do not (not x86-64
Linux, no compiler at install, the oneDNN wheel missing, wrong results on this
CPU): the models then use XLA's convolutions.

The direct kernels (`direct_kernels.inc`) are compiled for x86-64-v4 (AVX-512),
x86-64-v3 (AVX2) and the x86-64 baseline; the best the CPU runs is used, and
`use_kernel_variant` caps it (the tests run each).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

from simpsons_jax.cpu_conv import library, self_check
from simpsons_jax.cpu_conv.library import (
  KERNEL_VARIANTS,
  cpu_description,
  kernel_variants_here,
  use_kernel_variant,
)

_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.cache
def available() -> tuple[bool, str]:
  """(True, oneDNN's version) where the kernels are registered with XLA:CPU and
  compute the plain formulation's values and gradients on this CPU, else
  (False, why not), logged once. The first call loads them and checks."""
  loaded, detail = library.load()
  if not loaded:
    return False, detail
  # Concrete values even when the first call comes while tracing.
  with jax.ensure_compile_time_eval():
    wrong = self_check.failures(_checked_conv, _checked_block, _checked_dense, jax.jit)
  if not wrong:
    return True, detail
  why = (
    f"{detail} computed wrong results on {cpu_description()} in the self-check "
    f"({'; '.join(wrong)})"
  )
  logging.warning("Not using oneDNN's convolutions: %s. XLA's run instead.", why)
  return False, why


def _checked_conv(x, k, strides, pads, g, bfloat16=False):
  geometry = library.conv_geometry(x.shape, k.shape, strides, pads)
  y, vjp = jax.vjp(lambda x, k: library.conv(x, k, geometry, bfloat16), x, k)
  return (y, *vjp(g))


@functools.cache
def bfloat16() -> tuple[bool, str]:
  """(True, a line) where the convolutions take bfloat16 operands here: the
  kernels are `available()`, the CPU has bfloat16 dot products (AVX512_BF16 or
  AMX, within any ONEDNN_MAX_CPU_ISA cap) and they compute the plain
  formulation of the rounded operands in the self-check; else (False, why not)."""
  loaded, detail = available()
  if not loaded:
    return False, detail
  if not library.bfloat16_instructions():
    return False, f"{cpu_description()} has no bfloat16 dot products (AVX512_BF16, AMX)"
  with jax.ensure_compile_time_eval():
    wrong = self_check.failures(
      functools.partial(_checked_conv, bfloat16=True),
      functools.partial(_checked_block, bfloat16=True),
      functools.partial(_checked_dense, bfloat16=True),
      jax.jit,
      bfloat16=True,
    )
  if wrong:
    why = f"{detail} computed wrong bfloat16 results ({'; '.join(wrong)})"
    logging.warning("Not using bfloat16 convolutions: %s.", why)
    return False, why
  return True, f"bfloat16 on {cpu_description()}"


def _require_bfloat16() -> None:
  usable, why = bfloat16()
  if not usable:
    raise RuntimeError(f"bfloat16 convolutions are not used here: {why}.")


def _checked_block(x, k, b, pads, g, bfloat16=False):
  geometry = library.conv_geometry(x.shape, k.shape, (1, 1), pads)

  def block(x, k, b):
    return library.conv_relu_pool(x, k, b, geometry, 255.0, bfloat16)

  if x.dtype == jnp.uint8:  # Images get no gradient.
    y, vjp = jax.vjp(lambda k, b: block(x, k, b), k, b)
    return (y, None, *vjp(g))
  y, vjp = jax.vjp(block, x, k, b)
  return (y, *vjp(g))


def _checked_dense(x, k, g, bfloat16=False):
  y, vjp = jax.vjp(lambda x, k: library.dense(x, k, bfloat16), x, k)
  return (y, *vjp(g))


def relu_max_pool(x: jax.Array) -> jax.Array:
  """ReLU, then a 2x2 max pool ('VALID', odd edges dropped) of float32 NHWC
  `x`: `conv_relu_pool`'s pool alone, one pass forward and one backward. The
  same values and gradients as `models.max_pool_2x2(nn.relu(x))`, ties split
  evenly as autodiff splits them (equal to the bit)."""
  if x.ndim != 4 or x.dtype != jnp.float32:
    raise ValueError(f"relu_max_pool takes float32 NHWC arrays, not {x.dtype}{x.shape}")
  _require()
  return library.relu_pool(x)


def _require() -> None:
  loaded, why = available()
  if not loaded:
    raise RuntimeError(f"oneDNN's convolutions are not used here: {why}.")


def conv_relu_pool(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  window_strides: Sequence[int] = (1, 1),
  padding: str | Sequence[tuple[int, int]] = "SAME",
  divisor: float = 255.0,
  bfloat16: bool = False,
) -> jax.Array:
  """A float32 NHWC convolution with HWIO `kernel`, plus `bias`, then ReLU and a
  2x2 max pool ('VALID'), as one oneDNN convolution and one pass of the pool;
  with at most 4 input channels and stride 1 (the first block's RGB), as a
  direct convolution that pools each pair of rows while it is in L1.

  `x` may also be uint8 images, used as `x.astype(float32) / divisor` (computed
  a few rows at a time inside the direct convolution; they get no gradient;
  with a 3x3 kernel the kernel and bias gradients come from one pass that
  never writes the convolution's gradient).
  The same values and gradients as `models.max_pool_2x2(nn.relu(...))` of
  `lax.conv_general_dilated(...) + bias` within float32 rounding: the pool's
  gradient goes to each window's positive maximum, split evenly between ties.

  With `bfloat16` (where `bfloat16()` allows it), a block that oneDNN runs
  convolves `x` and `kernel` rounded to bfloat16, and its gradients take the
  convolution's gradient rounded to bfloat16, all accumulated in float32; the
  values, gradients and parameters stay float32. The direct convolution (the
  first block's few channels) stays float32.
  """
  _require()
  geometry = library.conv_geometry(x.shape, kernel.shape, window_strides, padding)
  direct = _direct(x.shape, kernel.shape, geometry)
  if x.dtype == jnp.uint8 and not direct:
    x = x.astype(jnp.float32) / divisor
  if bfloat16 and not direct:
    _require_bfloat16()
  return library.conv_relu_pool(
    x, kernel, bias, geometry, divisor, bfloat16 and not direct
  )


def _direct(shape, kernel_shape, geometry) -> bool:
  """Whether the block runs as the direct convolution (onednn_conv.cc's
  DirectConvHandles), the one path that reads uint8 images."""
  return 1 <= shape[-1] <= 4 and kernel_shape[-1] % 8 == 0 and geometry[:2] == (1, 1)


def _handled(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, groups) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4 or groups != 1:
    return False
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return False
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return False
  if dimension_numbers is None:
    return False
  return lax.conv_dimension_numbers(
    lhs.shape, rhs.shape, dimension_numbers
  ) == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
  *,
  bfloat16: bool = False,
) -> jax.Array:
  """`lax.conv_general_dilated`, through oneDNN for float32 NHWC/HWIO 2-D
  convolutions without dilation or groups where `available()`, through `lax`
  otherwise. With `bfloat16` (where `bfloat16()` allows it), oneDNN's
  convolutions take their operands, and the gradients the output's gradient,
  rounded to bfloat16; values and gradients stay float32."""
  if (
    not available()[0]
    or batch_group_count != 1
    or preferred_element_type is not None
    or not _handled(
      lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
    )
  ):
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      precision,
      preferred_element_type,
    )
  if bfloat16:
    _require_bfloat16()
  geometry = library.conv_geometry(lhs.shape, rhs.shape, window_strides, padding)
  return library.conv(lhs, rhs, geometry, bfloat16)


def dot_general(
  lhs: jax.Array,
  rhs: jax.Array,
  dimension_numbers: Any,
  precision: Any = None,
  preferred_element_type: Any = None,
  *,
  bfloat16: bool = False,
) -> jax.Array:
  """`lax.dot_general`, through oneDNN's matrix product for a float32 (M, K)
  by (K, N) product (a dense layer's) where `available()`, through `lax`
  otherwise. With `bfloat16` (where `bfloat16()` allows it), the product takes
  its operands, and its gradients the output's gradient, rounded to bfloat16;
  values and gradients stay float32."""
  (contract_lhs, contract_rhs), (batch_lhs, batch_rhs) = dimension_numbers
  if (
    not available()[0]
    or lhs.ndim != 2
    or rhs.ndim != 2
    or lhs.dtype != jnp.float32
    or rhs.dtype != jnp.float32
    or tuple(contract_lhs) != (1,)
    or tuple(contract_rhs) != (0,)
    or batch_lhs
    or batch_rhs
    or preferred_element_type not in (None, jnp.float32)
  ):
    return lax.dot_general(
      lhs, rhs, dimension_numbers, precision, preferred_element_type
    )
  if bfloat16:
    _require_bfloat16()
  return library.dense(lhs, rhs, bfloat16)


__all__ = [
  "KERNEL_VARIANTS",
  "available",
  "bfloat16",
  "conv_general_dilated",
  "conv_relu_pool",
  "cpu_description",
  "dot_general",
  "kernel_variants_here",
  "relu_max_pool",
  "use_kernel_variant",
]
