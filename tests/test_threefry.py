"""threefry's streams are jax.random's, bit for bit; Dropout's masks are Flax's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simpsons_jax import models, threefry

KEYS = {
  "raw": jax.random.PRNGKey(3),
  "folded": jax.random.fold_in(jax.random.PRNGKey(9), 4),
  "typed": jax.random.key(5),
}


def _words(key):
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(key))
  return np.asarray(key)


@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
def test_fold_in_and_split_are_jax_randoms(key):
  for data in (0, 1, 7, 2**31 + 5, np.uint32(4_000_000_000), jnp.int32(-3)):
    np.testing.assert_array_equal(
      _words(threefry.fold_in(key, data)), _words(jax.random.fold_in(key, data))
    )
  jitted = jax.jit(threefry.fold_in)(key, jnp.int32(12345))
  np.testing.assert_array_equal(_words(jitted), _words(jax.random.fold_in(key, 12345)))
  for num in (1, 2, 5, 6):
    np.testing.assert_array_equal(
      _words(threefry.split(key, num)), _words(jax.random.split(key, num))
    )


@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
@pytest.mark.parametrize("shape", [(), (0, 3), (3,), (5, 7), (2, 3, 4), (64, 4096)])
def test_bits_and_bernoulli_are_jax_randoms(key, shape):
  np.testing.assert_array_equal(
    jax.jit(threefry.bits, static_argnums=1)(key, shape),
    jax.random.bits(key, shape, jnp.uint32),
  )
  for p in (0.1, 0.5, 0.6, 0.999):
    np.testing.assert_array_equal(
      threefry.bernoulli(key, p, shape), jax.random.bernoulli(key, p, shape)
    )


def test_other_keys_go_through_jax_random():
  key = jax.random.key(1, impl="rbg")
  np.testing.assert_array_equal(
    jax.random.key_data(threefry.fold_in(key, 3)),
    jax.random.key_data(jax.random.fold_in(key, 3)),
  )
  np.testing.assert_array_equal(
    threefry.bits(key, (4, 5)), jax.random.bits(key, (4, 5), jnp.uint32)
  )


@pytest.mark.parametrize("rate", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("broadcast_dims", [(), (0,)])
def test_dropout_masks_are_flaxs(rate, broadcast_dims):
  x = jnp.arange(1, 801, dtype=jnp.float32).reshape(8, 100)
  rngs = {"dropout": jax.random.PRNGKey(1)}
  ours = models.Dropout(rate, broadcast_dims=broadcast_dims)
  flax = nn.Dropout(rate, broadcast_dims=broadcast_dims)
  np.testing.assert_array_equal(
    ours.apply({}, x, deterministic=False, rngs=rngs),
    flax.apply({}, x, deterministic=False, rngs=rngs),
  )
