"""The notebook's network: its exact size, pooling and output."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import full, strong
from simpsons_jax import convolutions, inference, models


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


@pytest.mark.slow
def test_bfloat16_compute_matches_float32_on_a_fixed_batch():
  config = full.get_config()
  config.data.image_size = 64
  model32 = models.create(config, num_classes=13)
  # Everything in bfloat16, as on GPU and TPU (on CPU, `create` rounds only
  # oneDNN's convolutions, or runs float32: tests/test_cpu_conv.py).
  model16 = model32.clone(dtype=jnp.bfloat16)
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


def _resnet_params_by_formula(stem, stages, num_classes):
  """Convs have no bias; each BatchNorm has a scale and a bias per channel."""
  total = 9 * 3 * stem + 2 * stem
  previous = stem
  for i, width in enumerate(stages):
    total += 9 * previous * width + 9 * width * width + 4 * width
    if i > 0 or previous != width:  # a 1x1 conv shortcut where shapes change
      total += previous * width + 2 * width
    previous = width
  return total + previous * num_classes + num_classes


def test_strong_model_parameter_count():
  config = strong.get_config()
  model = models.create(config, num_classes=10)
  variables = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.PRNGKey(0),
    jnp.zeros((1, 28, 28, 3), jnp.uint8),
  )
  assert models.count_params(variables["params"]) == 686_090
  assert _resnet_params_by_formula(32, (48, 96, 192), 10) == 686_090
  # Running means and variances: one pair per BatchNorm channel.
  assert models.count_params(variables["batch_stats"]) == 2 * (32 + 3 * (48 + 96 + 192))


@pytest.mark.slow
def test_resnet_batch_norm_modes():
  model = models.ResNet(num_classes=3, stem_features=8, stage_features=(8, 16))
  images = jax.random.randint(jax.random.PRNGKey(5), (6, 16, 16, 3), 0, 256, jnp.uint8)
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.PRNGKey(0), images
  )
  logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  # Training normalises with the batch's statistics and updates the running ones.
  stem_stats = updates["batch_stats"]["BatchNorm_0"]
  assert not np.allclose(
    stem_stats["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"]
  )
  # Evaluation uses the running statistics and changes nothing.
  a = model.apply(variables, images, train=False)
  b = model.apply(variables, images[:1], train=False)
  np.testing.assert_allclose(a[:1], b, rtol=1e-5, atol=1e-5)
  assert logits.shape == a.shape == (6, 3)


def test_flip_test_time_augmentation_averages_probabilities():
  def apply_fn(variables, images, train):
    del variables, train
    return images[:, 0, 0, :].astype(jnp.float32)  # depends on the left column

  images = jnp.zeros((2, 4, 4, 3), jnp.uint8)
  images = images.at[:, 0, 0, :].set(jnp.array([[1, 2, 3], [0, 0, 9]], jnp.uint8))
  images = images.at[:, 0, 3, :].set(jnp.array([[3, 2, 1], [5, 0, 0]], jnp.uint8))
  plain = inference.logits(apply_fn, {}, images)
  np.testing.assert_array_equal(plain, images[:, 0, 0, :])
  both = inference.logits(apply_fn, {}, images, flip=True)
  expected = 0.5 * (
    jax.nn.softmax(images[:, 0, 0, :].astype(jnp.float32))
    + jax.nn.softmax(images[:, 0, 3, :].astype(jnp.float32))
  )
  np.testing.assert_allclose(jnp.exp(both), expected, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strides, window", [(1, 3), (2, 3), (2, 1)])
def test_chunked_kernel_gradient_equals_the_plain_one(strides, window):
  x = jax.random.normal(jax.random.PRNGKey(6), (48, 28, 28, 4))
  kernel = jax.random.normal(jax.random.PRNGKey(7), (window, window, 4, 5))

  def grads(conv_fn):
    def loss(x, kernel):
      y = conv_fn(
        x,
        kernel,
        (strides, strides),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      return (y**2).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)

  plain = grads(jax.lax.conv_general_dilated)
  chunked = grads(convolutions.chunked_kernel_grad_conv)
  for a, b in zip(plain, chunked, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
