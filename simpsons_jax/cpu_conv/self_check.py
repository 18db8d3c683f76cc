"""The convolutions and matrix products written out plainly in float64, and
the check that the compiled kernels compute them on this CPU.

`plain_conv`, `plain_relu_pool` and `plain_dense` are the definitions the
kernels are held to (the tests run them over the whole shape space). `failures`
runs a few cases chosen to reach every kernel (oneDNN's forward and both
gradients, strided 1x1 convolutions, the direct convolution and its fused
backward, the pool, the matrix product and its transposed forms) through the
kernels and names those that differ: `cpu_conv.available` runs it
once, so that a CPU or oneDNN build that computes wrong gradients trains with
XLA's convolutions instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np

Pads = Sequence[tuple[int, int]]


def plain_conv(
  x: np.ndarray, k: np.ndarray, strides: Sequence[int], pads: Pads, g: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The NHWC convolution of `x` with the HWIO kernel `k` and its input and
  kernel gradients for the output gradient `g`, in float64: a sum over the
  kernel's offsets of strided slices of the padded input."""
  x, k, g = (np.asarray(a, np.float64) for a in (x, k, g))
  (top, bottom), (left, right) = pads
  xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  (sh, sw), (oh, ow) = strides, g.shape[1:3]
  y, dxp, dk = np.zeros(g.shape), np.zeros_like(xp), np.zeros_like(k)
  for i in range(k.shape[0]):
    for j in range(k.shape[1]):
      rows = slice(i, i + sh * (oh - 1) + 1, sh)
      cols = slice(j, j + sw * (ow - 1) + 1, sw)
      y += xp[:, rows, cols] @ k[i, j]
      dk[i, j] = np.einsum("nhwc,nhwo->co", xp[:, rows, cols], g)
      dxp[:, rows, cols] += g @ k[i, j].T
  return y, dxp[:, top : top + x.shape[1], left : left + x.shape[2]], dk


def conv_output_shape(
  shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: Pads
) -> tuple[int, int, int, int]:
  """(n, oh, ow, o) of an NHWC convolution with the HWIO `kernel` shape."""
  (top, bottom), (left, right) = pads
  return (
    shape[0],
    (shape[1] + top + bottom - kernel[0]) // strides[0] + 1,
    (shape[2] + left + right - kernel[1]) // strides[1] + 1,
    kernel[3],
  )


def plain_relu_pool(y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """ReLU and 2x2 max pool ('VALID', odd edges dropped) of float64 `y`, and
  the gradient for the pooled gradient `g`: each window's positive maximum
  takes it, split evenly between ties."""
  n, h, w, c = y.shape
  h2, w2 = h // 2, w // 2
  windows = y[:, : 2 * h2, : 2 * w2].reshape(n, h2, 2, w2, 2, c)
  top = windows.max(axis=(2, 4), keepdims=True)
  winners = (windows == top) & (top > 0)
  ties = np.maximum(winners.sum(axis=(2, 4), keepdims=True), 1)
  dy = np.zeros_like(y)
  dy[:, : 2 * h2, : 2 * w2] = (winners * g[:, :, None, :, None] / ties).reshape(
    n, 2 * h2, 2 * w2, c
  )
  return np.maximum(top[:, :, 0, :, 0], 0), dy


def plain_dense(
  x: np.ndarray, k: np.ndarray, g: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The product of `x` (M, K) and `k` (K, N), and its input and kernel
  gradients for the output gradient `g` (M, N), in float64."""
  x, k, g = (np.asarray(a, np.float64) for a in (x, k, g))
  return x @ k, g @ k.T, x.T @ g


def rounded(a: np.ndarray) -> np.ndarray:
  """`a` rounded to bfloat16 (to nearest even), as float32."""
  return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def plain_block(
  x: np.ndarray,
  k: np.ndarray,
  b: np.ndarray,
  pads: Pads,
  g: np.ndarray,
  divisor: float,
  bfloat16: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
  """`cpu_conv.conv_relu_pool` written out: the pooled value and the input
  (None for uint8 images), kernel and bias gradients. With `bfloat16`, the
  convolutions' operands (x, the kernel, the convolution's gradient) are
  rounded to bfloat16 first."""
  images = x.dtype == np.uint8
  if images:
    x = x.astype(np.float32) / np.float32(divisor)
  operand = rounded if bfloat16 else np.asarray
  x, k = operand(x), operand(k)
  conv_shape = conv_output_shape(x.shape, k.shape, (1, 1), pads)
  y = plain_conv(x, k, (1, 1), pads, np.zeros(conv_shape))[0]
  pooled, dy = plain_relu_pool(y + b, g)
  dy = operand(dy)
  _, dx, dk = plain_conv(x, k, (1, 1), pads, dy)
  return pooled, None if images else dx, dk, dy.sum(axis=(0, 1, 2))


def close(got: np.ndarray | None, expected: np.ndarray | None) -> bool:
  """Equal within float32 rounding of sums: 1e-5 relative to the largest."""
  if expected is None:
    return True
  got, expected = np.asarray(got), np.asarray(expected)
  scale = float(np.abs(expected).max()) if expected.size else 0.0
  return got.shape == expected.shape and bool(
    np.allclose(got, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-30))
  )


# (input shape, kernel shape, strides, pads): convolutions; and with a uint8
# flag, stride-1 blocks (conv + bias, ReLU, pool).
CONVS = (
  ((2, 8, 8, 4), (1, 1, 4, 6), (2, 2), ((0, 0), (0, 0))),  # oneDNN 3.2's AVX2 fault
  ((2, 9, 7, 5), (3, 3, 5, 6), (2, 1), ((1, 1), (0, 1))),
  ((2, 7, 9, 3), (3, 3, 3, 8), (1, 1), ((1, 1), (2, 0))),  # the direct convolution
)
BLOCKS = (
  ((2, 9, 10, 3), (3, 3, 3, 16), ((1, 1), (1, 1)), True),  # the first block
  ((2, 8, 7, 2), (5, 5, 2, 8), ((2, 2), (2, 2)), False),
  ((2, 9, 8, 8), (3, 3, 8, 12), ((1, 1), (1, 1)), False),  # oneDNN, then the pool
)
# (M, K, N): matrix products (a dense layer's batch, inputs, outputs).
DENSES = ((3, 5, 7), (1, 1, 1), (17, 70, 40), (16, 256, 64))


def _operands(
  rng: np.random.Generator, shape, kernel, out_shape, images: bool
) -> tuple[np.ndarray, ...]:
  if images:
    x = rng.integers(0, 256, shape, dtype=np.uint8)
  else:
    x = rng.standard_normal(shape).astype(np.float32)
  return (
    x,
    rng.standard_normal(kernel).astype(np.float32),
    rng.standard_normal(kernel[-1]).astype(np.float32),
    rng.standard_normal(out_shape).astype(np.float32),
  )


def failures(
  conv: Callable,
  block: Callable,
  dense: Callable,
  jit: Callable,
  bfloat16: bool = False,
) -> list[str]:
  """The cases whose value or gradients from `conv(x, k, strides, pads, g)`,
  `block(x, k, b, pads, g)` and `dense(x, k, g)` (each returning what
  `plain_conv`, `plain_block` and `plain_dense` return), all run in one `jit`,
  differ from the plain ones; with `bfloat16`, from the plain ones of the
  operands rounded to bfloat16 (uint8 blocks stay float32)."""
  rng = np.random.default_rng(0)
  conv_operands = [
    _operands(rng, s, k, conv_output_shape(s, k, st, p), False) for s, k, st, p in CONVS
  ]
  block_operands = []
  for shape, kernel, pads, images in BLOCKS:
    n, h, w, o = conv_output_shape(shape, kernel, (1, 1), pads)
    block_operands.append(_operands(rng, shape, kernel, (n, h // 2, w // 2, o), images))
  dense_operands = [
    tuple(rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (m, n)))
    for m, k, n in DENSES
  ]

  def run(conv_operands, block_operands, dense_operands):
    outputs = [
      conv(x, k, st, p, g)
      for (_, _, st, p), (x, k, _, g) in zip(CONVS, conv_operands, strict=True)
    ]
    outputs += [
      block(x, k, b, p, g)
      for (_, _, p, _), (x, k, b, g) in zip(BLOCKS, block_operands, strict=True)
    ]
    return outputs + [dense(x, k, g) for x, k, g in dense_operands]

  got = jit(run)(conv_operands, block_operands, dense_operands)
  operand = rounded if bfloat16 else np.asarray
  expected = (
    [
      plain_conv(operand(x), operand(k), st, p, operand(g))
      for (_, _, st, p), (x, k, _, g) in zip(CONVS, conv_operands, strict=True)
    ]
    + [
      plain_block(x, k, b, p, g, 255.0, bfloat16 and not images)
      for (_, _, p, images), (x, k, b, g) in zip(BLOCKS, block_operands, strict=True)
    ]
    + [plain_dense(*(operand(a) for a in operands)) for operands in dense_operands]
  )
  names = ("value", "input gradient", "kernel gradient", "bias gradient")
  cases = [f"conv {s}*{k} strides {st}" for s, k, st, _ in CONVS]
  cases += [f"block {s}*{k}{' uint8' if u else ''}" for s, k, _, u in BLOCKS]
  cases += [f"matrix product {m}x{k} by {k}x{n}" for m, k, n in DENSES]
  wrong = []
  for case, ours, plain in zip(cases, got, expected, strict=True):
    bad = [n for n, a, e in zip(names, ours, plain, strict=False) if not close(a, e)]
    if bad:
      wrong.append(f"{case}: {', '.join(bad)}")
  return wrong
