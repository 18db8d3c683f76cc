"""The notebook's network: its exact size, pooling and output."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import full
from simpsons_jax import models


def _init(model, image_size, transform=jax.jit):
  """Initial parameters; `transform=jax.eval_shape` gives shapes only."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  init = functools.partial(model.init, train=False)
  with jax.threefry_partitionable(False):
    return transform(init)(jax.random.PRNGKey(0), images)["params"]


def test_notebook_parameter_count():
  model = models.create(full.get_config(), num_classes=13)
  shapes = _init(model, 128, lambda f: functools.partial(jax.eval_shape, f))
  assert models.count_params(shapes) == 2_916_829


def test_layer_shapes_and_initialisation():
  params = _init(models.create(full.get_config(), num_classes=13), 128)
  assert params["conv0"]["kernel"].shape == (3, 3, 3, 8)
  assert params["conv3"]["kernel"].shape == (3, 3, 32, 64)
  assert params["dense0"]["kernel"].shape == (8 * 8 * 64, 512)
  assert params["logits"]["kernel"].shape == (512, 13)
  for layer in params.values():
    assert not np.any(layer["bias"])
  # Glorot-uniform: bounded by sqrt(6 / (fan_in + fan_out)).
  kernel = params["dense1"]["kernel"]
  assert np.abs(kernel).max() <= np.sqrt(6 / 1024)
  assert np.abs(kernel).max() > 0.9 * np.sqrt(6 / 1024)


def test_max_pool_matches_flax():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 10, 5))
  expected = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  np.testing.assert_array_equal(models.max_pool_2x2(x), expected)


def test_dropout_only_in_training():
  model = models.SimpsonsCNN(num_classes=4, dense_features=(32,), dropout_rate=0.5)
  images = jax.random.randint(jax.random.PRNGKey(2), (3, 16, 16, 3), 0, 256, jnp.uint8)
  variables = {"params": _init(model, 16)}
  eval_a = model.apply(variables, images, train=False)
  eval_b = model.apply(variables, images, train=False)
  train = model.apply(
    variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)}
  )
  assert eval_a.shape == (3, 4)
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train, eval_a)


def test_bfloat16_compute_matches_float32_on_a_fixed_batch():
  config = full.get_config()
  config.image_size = 64
  model32 = models.create(config, num_classes=13)
  config.dtype = "bfloat16"
  model16 = models.create(config, num_classes=13)
  params = _init(model32, 64)
  images = jax.random.randint(jax.random.PRNGKey(4), (16, 64, 64, 3), 0, 256, jnp.uint8)
  labels = jnp.arange(16) % 13
  # The same parameters serve both: checkpoints are interchangeable.
  assert jax.tree.map(jnp.shape, _init(model16, 64)) == jax.tree.map(jnp.shape, params)

  def loss(model):
    logits = model.apply({"params": params}, images, train=False)
    assert logits.dtype == jnp.float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  assert float(loss(model16)) == pytest.approx(float(loss(model32)), rel=2e-2)
  assert float(loss(model16)) != float(loss(model32))
