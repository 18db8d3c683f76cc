"""JAX's threefry random streams, computed in one fused pass.

On CPU JAX lowers its threefry hash as a loop of five rounds over whole arrays:
`jax.random.bits` reads and writes each array five times, and every
`fold_in` or `split` of a key is an XLA while loop (six of them, 119 copies,
in the notebook network's training step). Here the same hash of the same
counters is unrolled, which XLA fuses into the ops around it. The keys, bits
and Bernoulli draws are bit for bit `jax.random`'s (tested), so a run draws
the same numbers either way; keys of another kind (`rbg`) and threefry's older
non-partitionable streams go through `jax.random` itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Threefry-2x32's rotations (Salmon et al. 2011), as JAX applies them.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return lax.shift_left(x, np.uint32(bits)) | lax.shift_right_logical(
    x, np.uint32(32 - bits)
  )


def hash2x32(
  key: tuple[jax.Array, jax.Array], x: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 hash (20 rounds) of the uint32 pairs `x` under the
  uint32 pair `key`, as `jax.random`'s, unrolled."""
  ks = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
  x0, x1 = x[0] + ks[0], x[1] + ks[1]
  for i in range(5):
    for bits in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = x0 ^ _rotate_left(x1, bits)
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _words(key: jax.Array) -> jax.Array | None:
  """A threefry key's two uint32 words (a typed key's or a raw uint32[2]), or
  None where `jax.random` computes another stream (another kind of key, or
  threefry's non-partitionable streams)."""
  if not jax.config.jax_threefry_partitionable:
    return None
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape or str(jax.random.key_impl(key)) != "threefry2x32":
      return None
    return jax.random.key_data(key)
  if key.shape != (2,) or key.dtype != jnp.uint32:
    return None
  if jax.config.jax_default_prng_impl != "threefry2x32":
    return None
  return key


def _like(key: jax.Array, words: jax.Array) -> jax.Array:
  """`words` (..., 2) as keys of `key`'s kind: typed or raw."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(words, impl="threefry2x32")
  return words


def fold_in(key: jax.Array, data: int | jax.Array) -> jax.Array:
  """`jax.random.fold_in(key, data)`, bit for bit."""
  words = _words(key)
  if words is None:
    return jax.random.fold_in(key, data)
  data = jnp.uint32(data)  # As jax.random.fold_in converts it.
  high, low = hash2x32((words[0], words[1]), (jnp.zeros_like(data), data))
  return _like(key, jnp.stack([high, low]))


def split(key: jax.Array, num: int) -> jax.Array:
  """`jax.random.split(key, num)`, bit for bit."""
  words = _words(key)
  if words is None:
    return jax.random.split(key, num)
  index = lax.iota(jnp.uint32, num)
  high, low = hash2x32((words[0], words[1]), (jnp.zeros_like(index), index))
  return _like(key, jnp.stack([high, low], axis=-1))


def bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bits(key, shape, jnp.uint32)`, bit for bit."""
  words = _words(key)
  size = math.prod(shape)
  if words is None or size >= 2**32:
    return jax.random.bits(key, shape, jnp.uint32)
  # Each value hashes its index in the flattened array (high word 0 here).
  index = lax.iota(jnp.uint32, size).reshape(shape)
  high, low = hash2x32((words[0], words[1]), (jnp.zeros_like(index), index))
  return high ^ low


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)`, bit for bit: a float32 uniform
  from each value's 23 high bits, below float32 `p`."""
  mantissa = lax.shift_right_logical(bits(key, shape), np.uint32(9))
  one = np.array(1.0, np.float32).view(np.uint32)
  uniform = lax.bitcast_convert_type(mantissa | one, jnp.float32) - np.float32(1)
  return uniform < np.float32(p)
