"""The compiled kernels as differentiable JAX operations: each FFI handler
of `onednn_conv.cc` (through `library.call`) with a `jax.custom_vjp` tying its
forward pass to the handlers of its gradients. The convolution, the notebook
network's fused block (conv + bias, ReLU, 2x2 max pool), the pool alone and
the dense layer's product; with `bfloat16`, of operands rounded to bfloat16.

They call the handlers unconditionally: `cpu_conv`'s public functions decide
where they run (`available()`, `bfloat16()`) and fall back to `lax`."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from simpsons_jax.cpu_conv import library


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(
  x: jax.Array, kernel: jax.Array, geometry: tuple, bfloat16: bool = False
) -> jax.Array:
  """x * kernel in float32; with `bfloat16`, of the operands rounded to
  bfloat16 (accumulated in float32), the gradients taking the output's
  gradient rounded to bfloat16 too."""
  return _conv_forward(x, kernel, geometry, bfloat16)[0]


def _output_shape(x: jax.Array, kernel: jax.Array, geometry) -> tuple[int, ...]:
  stride_h, stride_w, (top, bottom), (left, right) = geometry
  n, h, w, _ = x.shape
  kh, kw, _, features = kernel.shape
  return (
    n,
    (h + top + bottom - kh) // stride_h + 1,
    (w + left + right - kw) // stride_w + 1,
    features,
  )


def _conv_forward(x, kernel, geometry, bfloat16):
  if bfloat16:  # The rounded operands are kept for the gradients.
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  y = library.call(
    "forward", _f32(*_output_shape(x, kernel, geometry)), x, kernel, geometry=geometry
  )
  return y, (x, kernel)


def _conv_backward(geometry, bfloat16, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  dx = library.call("backward_data", _f32(*x.shape), dy, kernel, geometry=geometry)
  dkernel = library.call(
    "backward_weights", _f32(*kernel.shape), x, dy, geometry=geometry
  )
  return dx, dkernel


conv.defvjp(_conv_forward, _conv_backward)


def conv_geometry(
  shape: Sequence[int],
  kernel_shape: Sequence[int],
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
) -> tuple:
  """The attributes the handlers take for a convolution of NHWC `shape` with
  HWIO `kernel_shape`: (stride_h, stride_w, (top, bottom), (left, right)),
  'SAME' and 'VALID' padding resolved as `lax` resolves them."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(shape[1:3], kernel_shape[:2], window_strides, padding)
  return (
    int(window_strides[0]),
    int(window_strides[1]),
    tuple(int(p) for p in padding[0]),
    tuple(int(p) for p in padding[1]),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def conv_relu_pool(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  geometry: tuple,
  divisor: float,
  bfloat16: bool,
) -> jax.Array:
  """ReLU and a 2x2 max pool of x * kernel + bias; uint8 `x` is read as
  x / divisor and gets no gradient; with `bfloat16` as `conv`."""
  return _conv_relu_pool_forward(x, kernel, bias, geometry, divisor, bfloat16)[0]


def _conv_relu_pool_forward(x, kernel, bias, geometry, divisor, bfloat16):
  n, h, w, c = _output_shape(x, kernel, geometry)
  pooled = (n, h // 2, w // 2, c)
  outputs = (_f32(*pooled), jax.ShapeDtypeStruct(pooled, jnp.int8))
  if x.dtype == jnp.uint8:
    y, code = library.call(
      "conv_relu_pool_forward_u8",
      outputs,
      x,
      kernel,
      bias,
      geometry=geometry,
      divisor=np.float32(divisor),
    )
    return y, (x, kernel, code, (n, h, w, c))
  if bfloat16:  # The rounded operands are kept for the gradients.
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  y, code = library.call(
    "conv_relu_pool_forward", outputs, x, kernel, bias, geometry=geometry
  )
  return y, (x, kernel, code, (n, h, w, c))


def _conv_relu_pool_backward(geometry, divisor, bfloat16, residuals, g):
  x, kernel, code, y_shape = residuals
  images = x.dtype == jnp.uint8
  gradients = (_f32(*kernel.shape), _f32(kernel.shape[-1]))
  if images and kernel.shape[:2] == (3, 3):
    # The first block: the convolution's gradient never leaves the kernel.
    dkernel, dbias = library.call(
      "conv_relu_pool_backward_u8",
      gradients,
      x,
      code,
      g,
      geometry=geometry,
      divisor=np.float32(divisor),
    )
    return None, dkernel, dbias
  if bfloat16:  # Rounded as the pool's gradient is written.
    bf16 = jax.ShapeDtypeStruct(y_shape, jnp.bfloat16)
    dy = library.call("relu_pool_backward_to_bf16", bf16, code, g)
  else:
    dy = library.call("relu_pool_backward", _f32(*y_shape), code, g)
  dkernel, dbias = library.call(
    "backward_weights_bias",
    gradients,
    x.astype(jnp.float32) / divisor if images else x,
    dy,
    geometry=geometry,
  )
  if images:  # Images have no gradient.
    return None, dkernel, dbias
  dx = library.call("backward_data", _f32(*x.shape), dy, kernel, geometry=geometry)
  return dx, dkernel, dbias


conv_relu_pool.defvjp(_conv_relu_pool_forward, _conv_relu_pool_backward)


@jax.custom_vjp
def relu_pool(x: jax.Array) -> jax.Array:
  """ReLU and a 2x2 max pool of float32 NHWC `x`."""
  return _relu_pool_forward(x)[0]


def _relu_pool_forward(x):
  n, h, w, c = x.shape
  pooled = (n, h // 2, w // 2, c)
  y, code = library.call(
    "relu_pool_forward", (_f32(*pooled), jax.ShapeDtypeStruct(pooled, jnp.int8)), x
  )
  return y, (code, x.shape)


def _relu_pool_backward(residuals, g):
  code, shape = residuals
  return (library.call("relu_pool_backward", _f32(*shape), code, g),)


relu_pool.defvjp(_relu_pool_forward, _relu_pool_backward)


def _matmul(a: jax.Array, b: jax.Array, transpose_a=False, transpose_b=False):
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  return library.call(
    "matmul", _f32(m, n), a, b, transpose_a=transpose_a, transpose_b=transpose_b
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, kernel: jax.Array, bfloat16: bool) -> jax.Array:
  """x @ kernel in float32; with `bfloat16` as `conv`."""
  return _dense_forward(x, kernel, bfloat16)[0]


def _dense_forward(x, kernel, bfloat16):
  if bfloat16:  # The rounded operands are kept for the gradients.
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  return _matmul(x, kernel), (x, kernel)


def _dense_backward(bfloat16, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  return _matmul(dy, kernel, transpose_b=True), _matmul(x, dy, transpose_a=True)


dense.defvjp(_dense_forward, _dense_backward)
