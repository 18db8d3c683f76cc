"""Which convolutions the models run, chosen per platform: oneDNN's kernels
(`cpu_conv`) on one x86 CPU device, XLA's own elsewhere, and on XLA:CPU a
kernel gradient summed over chunks of the batch. Each computes the same
function of the same parameters (tested against the plain formulation)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from simpsons_jax import cpu_conv, host_memory

# XLA:CPU's kernel-gradient convolution slows down sharply once the batch's
# pixels outgrow the cache (docs/performance.md). Each chunk holds about this
# many input pixels; the chunk count is capped to bound the unrolled graph
# (and compile time).
KERNEL_GRAD_PIXELS = 8 * 14 * 14


MAX_KERNEL_GRAD_CHUNKS = 16


def chunked_kernel_grad_conv(lhs: jax.Array, rhs: jax.Array, *args, **kwargs):
  """`lax.conv_general_dilated` whose kernel gradient is summed over chunks of
  the batch (axis 0), for XLA:CPU. Same values as the plain convolution up to
  float summation order.

  With G chunks, chunk k holds rows k, k + G, k + 2G, ... so that a batch
  sharded over devices splits evenly: every device holds part of every chunk.
  """

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, *args, **kwargs)

  @jax.custom_vjp
  def f(x, kernel):
    return conv(x, kernel)

  def forward(x, kernel):
    return conv(x, kernel), (x, kernel)

  def backward(residuals, g):
    x, kernel = residuals
    (dx,) = jax.vjp(lambda x: conv(x, kernel), x)[1](g)
    n = x.shape[0]
    if not isinstance(n, int):  # A symbolic batch (jax.export): one chunk.
      return dx, jax.vjp(functools.partial(conv, x), kernel)[1](g)[0]
    rows = max(1, KERNEL_GRAD_PIXELS // (x.shape[1] * x.shape[2]))
    chunks = max(1, min(n // rows, MAX_KERNEL_GRAD_CHUNKS))
    while n % chunks:
      chunks -= 1
    xs = x.reshape(n // chunks, chunks, *x.shape[1:])
    gs = g.reshape(n // chunks, chunks, *g.shape[1:])
    dkernel = sum(
      jax.vjp(functools.partial(conv, xs[:, i]), kernel)[1](gs[:, i])[0]
      for i in range(chunks)
    )
    return dx, dkernel

  f.defvjp(forward, backward)
  return f(lhs, rhs)


def implementation(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """Which convolutions the models use here ('onednn' or 'xla'), and a line
  saying so for the log.

  On one x86 CPU device, oneDNN's kernels (`cpu_conv`) unless
  `config.train.cpu_kernels` is 'xla' or they did not load; elsewhere XLA's own (on
  several simulated CPU devices XLA would run each custom call whole on every
  device). Either computes the same function of the same parameters.
  """
  if jax.default_backend() != "cpu":
    return "xla", f"XLA's ({jax.default_backend()})"
  if config.train.cpu_kernels == "xla":
    return "xla", "XLA:CPU's (--config.train.cpu_kernels=xla)"
  if jax.device_count() > 1:
    return (
      "xla",
      f"XLA:CPU's (oneDNN's run on one CPU device, not {jax.device_count()})",
    )
  loaded, detail = cpu_conv.available()
  if loaded:
    return "onednn", f"{detail} on {cpu_conv.cpu_description()}"
  return "xla", f"XLA:CPU's (oneDNN kernels unavailable: {detail})"


def precision(
  config: ml_collections.ConfigDict, kernels: str
) -> tuple[jnp.dtype, bool, str]:
  """(the type the models compute in, whether their convolutions round their
  operands to bfloat16, why a bfloat16 run computes in float32 or '') for
  `config.train.dtype` with `kernels`' convolutions.

  On GPU and TPU, bfloat16 computes everything in bfloat16. On a CPU with
  oneDNN's kernels and bfloat16 dot products (`cpu_conv.bfloat16()`), it
  rounds the operands of oneDNN's convolutions and (in the notebook network)
  matrix products alone, as PyTorch's autocast does, and computes the rest in
  float32: XLA:CPU's bfloat16 BatchNorm, matrix products and their gradients
  were slower than its float32 ones (docs/performance.md). Elsewhere on CPU it
  computes in float32. Parameters and optimizer state are
  float32 either way.
  """
  dtype = jnp.dtype(config.train.dtype)
  if dtype != jnp.bfloat16 or jax.default_backend() != "cpu":
    return dtype, False, ""
  usable, why = cpu_conv.bfloat16() if kernels == "onednn" else (False, "")
  if usable:
    return jnp.dtype(jnp.float32), True, ""
  why = why or "bfloat16 needs oneDNN's convolutions here"
  return (
    jnp.dtype(jnp.float32),
    False,
    f"--config.train.dtype=bfloat16 runs in float32 on this CPU: {why}.",
  )


@functools.cache
def set_up(line: str, precision_note: str = "") -> None:
  """Once per process: logs which convolutions run, why a bfloat16 run
  computes in float32 (`precision`'s note) and, on CPU, whether a step's
  memory is reused (see `host_memory`)."""
  logging.info("Convolutions: %s.", line)
  if precision_note:
    logging.info("%s", precision_note)
  if jax.default_backend() == "cpu" and host_memory.kept():
    logging.info("Memory: one malloc arena, freed blocks kept (no faults per step).")


def conv_fn(kernels: str, bfloat16: bool = False) -> Callable | None:
  """What replaces `lax.conv_general_dilated` in models that take `conv_fn`;
  with `bfloat16` (see `precision`), oneDNN's rounding its operands."""
  if kernels == "onednn" and bfloat16:
    return functools.partial(cpu_conv.conv_general_dilated, bfloat16=True)
  if kernels == "onednn":
    return cpu_conv.conv_general_dilated
  if jax.default_backend() == "cpu":
    # On XLA:CPU the kernel gradients are faster summed over batch chunks.
    return chunked_kernel_grad_conv
  return None
