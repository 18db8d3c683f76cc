"""Training and evaluation: steps, exact metrics, resume and device count."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import overfit, strong
from simpsons_jax import (
  checkpointing,
  data,
  evaluators,
  input_pipeline,
  metrics,
  models,
  sharding,
  train,
)
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core
from tests.conftest import shared_data


@pytest.mark.slow
def test_train_step_lowers_the_loss_on_a_fixed_batch(tiny_config):
  tiny_config.model.simpsons_cnn.dropout_rate = 0.0
  mesh = sharding.make_mesh()
  model = models.create(tiny_config, num_classes=6)
  state = train.create_train_state(
    model, tiny_config, jax.random.PRNGKey(0), steps_per_epoch=1
  )
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
    "label": np.arange(16, dtype=np.int32) % 6,
  }
  train_step = train.jit_train_step(mesh, tiny_config)
  losses = []
  for _ in range(40):
    state, sums = train_step(state, sharding.shard_batch(batch, mesh))
    losses.append(float(sums["loss_sum"]) / 16)
  assert int(state.step) == 40
  assert losses[-1] < 0.5 * losses[0]


def _fixed_prediction_state(num_classes):
  """A state whose 'model' predicts the class written in pixel (0, 0, 0)."""

  def apply_fn(variables, images, train):
    del variables, train
    return 5.0 * jax.nn.one_hot(images[:, 0, 0, 0], num_classes)

  return train.TrainState.create(
    apply_fn=apply_fn,
    params={"unused": jnp.zeros(())},
    tx=optax.identity(),
    rng=jax.random.PRNGKey(0),
  )


def _validate(state, batches, mesh, num_classes, flip=False) -> dict:
  """The metrics of the training loop's validation, as it computes them."""
  score = evaluators.scorer(mesh, state.apply_fn, num_classes, flip)
  totals, _ = evaluators.accumulate(score, state.inference_variables(), batches, mesh)
  return metrics.summarize(totals)


def test_evaluation_counts_each_example_once_exactly():
  # 13 examples, batch 8: the second batch is padded with 3 masked rows.
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2], np.int32)
  predicted = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0], np.int32)
  images = np.zeros((13, 4, 4, 3), np.uint8)
  images[:, 0, 0, 0] = predicted
  batches = [
    core.pad_batch({"image": images[i : i + 8], "label": labels[i : i + 8]}, 8)
    for i in (0, 8)
  ]
  mesh = sharding.make_mesh()
  result = _validate(_fixed_prediction_state(3), batches, mesh, 3)

  assert result["accuracy"] == pytest.approx(9 / 13)
  assert result["top3_accuracy"] == 1.0
  # Per class recall 3/4, 2/3, 4/6; precision 3/5, 2/3, 4/5.
  f1 = [
    2 * p * r / (p + r) for p, r in [(3 / 5, 3 / 4), (2 / 3, 2 / 3), (4 / 5, 4 / 6)]
  ]
  assert result["macro_f1"] == pytest.approx(np.mean(f1))
  assert result["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 4 / 6) / 3)
  logit_loss = -jax.nn.log_softmax(jnp.array([5.0, 0, 0]))
  expected_loss = (9 * logit_loss[0] + 4 * logit_loss[1]) / 13
  assert result["loss"] == pytest.approx(float(expected_loss), rel=1e-6)


def test_confusion_totals_add_up_to_the_examples():
  confusion = np.array([[3, 1, 0], [0, 2, 1], [2, 0, 4]])
  stats = metrics.per_class(confusion)
  np.testing.assert_allclose(stats["support"], [4, 3, 6])
  np.testing.assert_allclose(stats["precision"], [3 / 5, 2 / 3, 4 / 5])
  np.testing.assert_allclose(stats["recall"], [3 / 4, 2 / 3, 4 / 6])


def _params(state):
  return jax.tree.leaves(jax.device_get(state.params))


@pytest.mark.slow
def test_stop_and_resume_equals_an_uninterrupted_run(tiny_config, tmp_path):
  tiny_config.train.num_epochs = 3
  uninterrupted, _ = train.train_and_evaluate(tiny_config, tmp_path / "a")

  tiny_config.train.num_epochs = 1
  train.train_and_evaluate(tiny_config, tmp_path / "b")
  tiny_config.train.num_epochs = 3
  resumed, _ = train.train_and_evaluate(tiny_config, tmp_path / "b")

  assert int(resumed.step) == int(uninterrupted.step)
  for a, b in zip(_params(uninterrupted), _params(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def _crash_then_resume(config, workdir, monkeypatch, crash_at: int):
  """Trains until batch `crash_at` kills the run, then reruns; the final state."""
  real_batches = input_pipeline.train_batches

  def crashing_batches(*args, **kwargs):
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      if i == crash_at:
        raise KeyboardInterrupt("killed mid-epoch")
      yield batch

  monkeypatch.setattr(input_pipeline, "train_batches", crashing_batches)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir)
  monkeypatch.setattr(input_pipeline, "train_batches", real_batches)
  return train.train_and_evaluate(config, workdir)[0]


@pytest.mark.slow
def test_crash_mid_epoch_resumes_from_the_last_checkpoint(
  tiny_config, tmp_path, monkeypatch
):
  tiny_config.train.num_epochs = 2
  uninterrupted, _ = train.train_and_evaluate(tiny_config, tmp_path / "a")
  steps_per_epoch = int(uninterrupted.step) // 2

  resumed = _crash_then_resume(
    tiny_config, tmp_path / "b", monkeypatch, steps_per_epoch + 3
  )
  for a, b in zip(_params(uninterrupted), _params(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_eight_devices_train_like_one(tiny_config, tmp_path):
  assert jax.device_count() == 8
  one_state, one = train.train_and_evaluate(
    tiny_config, tmp_path / "one", mesh=sharding.make_mesh(jax.devices()[:1])
  )
  eight_state, eight = train.train_and_evaluate(tiny_config, tmp_path / "eight")
  assert one["loss"] == pytest.approx(eight["loss"], rel=1e-4)
  # Adam turns reduction-order noise in near-zero gradients into steps of up
  # to the learning rate, so parameters agree to a few such steps.
  for a, b in zip(_params(one_state), _params(eight_state), strict=True):
    np.testing.assert_allclose(a, b, atol=2 * tiny_config.optim.learning_rate)


def test_batch_that_devices_do_not_divide_is_rejected(tiny_config, tmp_path):
  tiny_config.train.batch_size = 12
  with pytest.raises(ValueError, match="does not split over 8 devices"):
    train.train_and_evaluate(tiny_config, tmp_path)


@pytest.mark.slow
def test_overfit_config_fits_real_frames_exactly(tmp_path):
  config = overfit.get_config()
  config.data.dir = str(shared_data("simpsons-mnist", "train"))
  config.data.min_images = 1
  config.data.image_size = 28
  # Validated every epoch: 80 images rather than 400 (the 1% is still 80).
  config.data.val_fraction = 0.01
  state, _ = train.train_and_evaluate(config, tmp_path)

  cmap, small, _ = data.create(config).load(tmp_path)
  assert len(small) == 80
  mesh = sharding.make_mesh()
  batches = core.eval_batches(small, config.data.image_size, config.train.batch_size)
  result = _validate(state, batches, mesh, cmap.num_classes, config.test_time_flip)
  assert result["accuracy"] == 1.0


def test_steps_are_pure_functions_of_their_inputs(tiny_config):
  model = models.create(tiny_config, num_classes=6)
  state = train.create_train_state(
    model, tiny_config, jax.random.PRNGKey(0), steps_per_epoch=1
  )
  batch = {
    "image": np.full((16, 32, 32, 3), 128, np.uint8),
    "label": np.zeros(16, np.int32),
  }
  step = jax.jit(functools.partial(train.train_step))
  (a, _), (b, _) = step(state, batch), step(state, batch)
  for x, y in zip(_params(a), _params(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture
def resnet_config(tiny_config):
  """Every option of the strong config, plus CutMix, shrunk to the tiny folder."""
  config = strong.get_config()
  config.data = tiny_config.data
  config.train.batch_size = tiny_config.train.batch_size
  config.model.resnet.stem_features, config.model.resnet.stage_features = 8, (8, 16)
  config.train.class_weights = "balanced"
  config.optim.ema_decay = 0.9
  config.train.mix = "cutmix"
  config.train.num_epochs, config.train.log_every_steps = 2, 2
  return config


def _variables(state):
  trees = {"params": state.params, "batch_stats": state.batch_stats, "ema": state.ema}
  return jax.device_get(trees)


@pytest.mark.slow
def test_strong_run_resumes_exactly_and_saves_its_statistics(
  resnet_config, tmp_path, monkeypatch
):
  uninterrupted, _ = train.train_and_evaluate(resnet_config, tmp_path / "a")
  steps_per_epoch = int(uninterrupted.step) // resnet_config.train.num_epochs
  # Killed in epoch 2 (the cosine schedule needs the same num_epochs), then
  # resumed from the checkpoint of epoch 1.
  resumed = _crash_then_resume(
    resnet_config, tmp_path / "b", monkeypatch, steps_per_epoch + 1
  )
  a, b = _variables(uninterrupted), _variables(resumed)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  # The running statistics moved away from their initial (0 mean, 1 var) values.
  stem = a["batch_stats"]["BatchNorm_0"]
  assert np.abs(stem["mean"]).max() > 1e-3
  assert not np.allclose(stem["var"], 1.0)
  # Prediction reads the EMA variables of the checkpoint, statistics included.
  trained = trained_run.load(tmp_path / "b", checkpoint="latest")
  for x, y in zip(
    jax.tree.leaves(trained.variables), jax.tree.leaves(a["ema"]), strict=True
  ):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_batch_norm_statistics_cover_the_global_batch(resnet_config):
  model = models.create(resnet_config, num_classes=6)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
    "label": np.arange(16, dtype=np.int32) % 6,
  }
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    step = train.jit_train_step(mesh, resnet_config)
    state = train.create_train_state(
      model, resnet_config, jax.random.PRNGKey(0), steps_per_epoch=4
    )
    placed = jax.device_put(state, sharding.replicated(mesh))
    new_state, _ = step(placed, sharding.shard_batch(batch, mesh))
    results.append(jax.device_get(new_state.batch_stats))
  # Eight devices of two images each normalise with the statistics of all 16.
  for x, y in zip(*map(jax.tree.leaves, results), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@flax.struct.dataclass
class _Step:
  step: jax.Array
  w: jax.Array


@pytest.mark.parametrize(
  ("metric", "best"), [("accuracy", 2), ("macro_f1", 3), ("balanced_accuracy", 1)]
)
def test_the_best_checkpoint_is_ranked_by_the_configured_metric(tmp_path, metric, best):
  manager = checkpointing.create_manager(tmp_path, keep=1, metric=metric)
  scores = {  # step: (accuracy, macro_f1, balanced_accuracy)
    1: (0.5, 0.3, 0.9),
    2: (0.9, 0.4, 0.5),
    3: (0.7, 0.8, 0.6),
    4: (0.1, 0.1, 0.1),
  }
  for step, (accuracy, f1, balanced) in scores.items():
    values = {"accuracy": accuracy, "macro_f1": f1, "balanced_accuracy": balanced}
    state = _Step(jnp.asarray(step), jnp.zeros(2))
    checkpointing.save(manager, state, {}, {f"val_{k}": v for k, v in values.items()})
  manager.wait_until_finished()
  assert manager.best_step() == best
  assert manager.all_steps() == sorted({best, 4})
  manager.close()


@pytest.mark.slow
def test_profile_steps_write_a_trace_tensorboard_opens(tiny_config, tmp_path):
  tiny_config.train.num_epochs = 1
  tiny_config.train.profile_steps = 2
  train.train_and_evaluate(tiny_config, tmp_path)
  traces = list(
    (tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb")
  )
  assert len(traces) == 1 and traces[0].stat().st_size > 0
