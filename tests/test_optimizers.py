"""Schedules, weight decay, EMA, label smoothing, class weights and the loss of
mixed batches, by formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from simpsons_jax import losses, mixing, optimizers, train


def test_warmup_then_cosine_to_zero():
  config = default.get_config()
  config.optim.schedule, config.optim.learning_rate = "cosine", 0.4
  config.optim.warmup_epochs, config.train.num_epochs = 2.0, 10
  lr = optimizers.learning_rate(config, steps_per_epoch=5)  # 10 warmup, 50 total
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.2)
  assert float(lr(10)) == pytest.approx(0.4)
  for step in (20, 30, 45):
    expected = 0.4 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 40))
    assert float(lr(step)) == pytest.approx(expected, rel=1e-5)
  assert float(lr(50)) == pytest.approx(0.0, abs=1e-7)


def test_the_notebook_keeps_a_constant_adam():
  config = default.get_config()
  assert optimizers.learning_rate(config, 100) == 1e-3
  params = {"w": jnp.ones((2, 2))}
  ours = optimizers.create(config, 100)
  expected = optax.adam(1e-3)
  grads = {"w": jnp.full((2, 2), 0.5)}
  a, _ = ours.update(grads, ours.init(params), params)
  b, _ = expected.update(grads, expected.init(params), params)
  np.testing.assert_array_equal(a["w"], b["w"])


# The first step with zero gradients moves only by the decay, lr * wd * w
# (times 1 + 0.9 for Nesterov momentum's look-ahead).
@pytest.mark.parametrize("name, first_step", [("adamw", 0.05), ("sgd", 0.095)])
def test_weight_decay_spares_biases_and_norm_scales(name, first_step):
  config = default.get_config()
  config.optim.name, config.optim.weight_decay, config.optim.learning_rate = (
    name,
    0.1,
    0.5,
  )
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "scale": jnp.ones(2)}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = optimizers.create(config, 1)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(
    updates["kernel"], -first_step * np.ones((2, 2)), rtol=1e-6
  )
  np.testing.assert_array_equal(updates["bias"], 0)
  np.testing.assert_array_equal(updates["scale"], 0)


def test_ema_decay_ramps_up_then_holds():
  assert float(optimizers.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
  assert float(optimizers.ema_decay_at(10, 0.999)) == pytest.approx(11 / 20)
  assert float(optimizers.ema_decay_at(100_000, 0.999)) == pytest.approx(0.999)
  ema = optimizers.update_ema({"a": jnp.array(2.0)}, {"a": jnp.array(4.0)}, 0.75)
  assert float(ema["a"]) == pytest.approx(0.75 * 2 + 0.25 * 4)


def test_balanced_class_weights():
  weights = losses.class_weights(np.array([0, 0, 0, 1, 2, 2]), 4, "balanced")
  # n / (K n_c): 6 / (4 * 3), 6 / (4 * 1), 6 / (4 * 2); none for an absent class.
  np.testing.assert_allclose(weights, [0.5, 1.5, 0.75, 0.0])
  assert losses.class_weights(np.array([0, 1]), 2, "none") is None


def _linear_state(config, num_classes=3):
  """A state whose logits are the first pixel's channels times a weight."""

  def apply_fn(variables, images, train, rngs=None, mutable=()):
    del train, rngs
    logits = variables["params"]["w"] * images[:, 0, 0, :num_classes].astype(
      jnp.float32
    )
    return (logits, {}) if mutable else logits

  return train.TrainState.create(
    apply_fn=apply_fn,
    params={"w": jnp.ones(())},
    tx=optimizers.create(config, steps_per_epoch=1),
    rng=jax.random.PRNGKey(0),
    ema={"params": {"w": jnp.ones(())}, "batch_stats": {}}
    if config.optim.ema_decay
    else None,
  )


def test_smoothed_weighted_loss_and_ema_on_a_hand_built_batch():
  config = default.get_config()
  config.optim.name, config.optim.learning_rate = "sgd", 0.1
  config.optim.ema_decay, config.train.label_smoothing = 0.9, 0.3
  images = np.zeros((4, 2, 2, 3), np.uint8)
  images[:, 0, 0] = [[2, 0, 0], [0, 1, 0], [0, 0, 3], [1, 1, 0]]
  labels = np.array([0, 1, 0, 2], np.int32)
  weights = np.array([0.5, 2.0, 1.0], np.float32)
  state, sums = train.train_step(
    _linear_state(config),
    {"image": images, "label": labels},
    label_smoothing=0.3,
    weights=jnp.asarray(weights),
    ema_decay=0.9,
  )
  logits = images[:, 0, 0].astype(np.float64)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  targets = np.eye(3)[labels] * 0.7 + 0.1
  expected = -(targets * log_p).sum(1) * weights[labels]
  assert float(sums["loss_sum"]) == pytest.approx(expected.sum(), rel=1e-5)
  assert int(sums["correct"]) == 2  # rows 0 and 1 (row 3 ties, argmax picks 0)
  # d loss / d w at w = 1, then SGD with Nesterov momentum 0.9: -lr * 1.9 * g.
  p = np.exp(log_p)
  grad = (((p - targets) * logits).sum(1) * weights[labels]).mean()
  w = 1 - 0.1 * 1.9 * grad
  assert float(state.params["w"]) == pytest.approx(w, rel=1e-5)
  decay = 2 / 11  # after step 1: min(0.9, (1 + 1) / (10 + 1))
  assert float(state.ema["params"]["w"]) == pytest.approx(
    decay * 1 + (1 - decay) * w, rel=1e-5
  )


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_loss_of_a_mixed_batch_weighs_both_labels_by_lam(kind):
  config = default.get_config()
  rng = np.random.default_rng(1)
  images = rng.integers(0, 4, (6, 8, 8, 3)).astype(np.uint8)
  labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
  weights = np.array([0.5, 2.0, 1.0], np.float32)
  state = _linear_state(config)
  _, sums = train.train_step(
    state,
    {"image": images, "label": labels},
    label_smoothing=0.3,
    weights=jnp.asarray(weights),
    mix=kind,
    mix_alpha=0.5,
  )
  key = jax.random.fold_in(jax.random.fold_in(state.rng, 0), train.MIX_STREAM)
  mixed, lam = mixing.mix(key, images, kind, 0.5)
  logits = np.asarray(mixed, np.float64)[:, 0, 0]
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))

  def loss(labels):
    targets = np.eye(3)[labels] * 0.7 + 0.1
    return -(targets * log_p).sum(1) * weights[labels]

  lam = float(lam)
  expected = lam * loss(labels) + (1 - lam) * loss(labels[::-1])
  assert float(sums["loss_sum"]) == pytest.approx(expected.sum(), rel=1e-5)
