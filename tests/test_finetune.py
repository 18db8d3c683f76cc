"""Starting from another run: loaded, mapped and fresh layers; frozen, slow ones."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simpsons_jax import finetune, freezing, sharding, synthetic, train
from simpsons_jax import trained as trained_run
from tests.conftest import make_tiny_config


def _variables(kernel, bias):
  return {
    "params": {
      "conv0": {"kernel": np.full((3, 3, 3, 2), 7.0, np.float32)},
      "logits": {"kernel": kernel, "bias": bias},
    },
    "batch_stats": {},
  }


def test_the_head_is_mapped_by_character_name_and_the_rest_loaded():
  source = _variables(
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array([10, 11, 12], np.float32)
  )
  fresh = _variables(np.full((2, 4), -1, np.float32), np.full(4, -1, np.float32))
  fresh["params"]["conv0"]["kernel"] = np.zeros((3, 3, 3, 2), np.float32)
  merged, report = finetune.merge(
    fresh, source, ["lisa", "new_one", "bart", "homer"], ["bart", "homer", "lisa"]
  )
  np.testing.assert_array_equal(
    merged["params"]["logits"]["kernel"], [[2, -1, 0, 1], [5, -1, 3, 4]]
  )
  np.testing.assert_array_equal(merged["params"]["logits"]["bias"], [12, -1, 10, 11])
  assert (merged["params"]["conv0"]["kernel"] == 7).all()
  assert report[0] == "loaded 1 of 3 arrays"
  assert "3 characters mapped by name, 1 initialised afresh (new_one)" in report[1]
  fresh = _variables(np.zeros((2, 3), np.float32), np.zeros(3, np.float32))
  same, report = finetune.merge(fresh, source, ["a", "b", "c"], ["a", "b", "c"])
  assert report == ["loaded 3 of 3 arrays"]
  np.testing.assert_array_equal(same["params"]["logits"]["bias"], [10, 11, 12])


def test_a_layer_of_another_shape_or_family_is_refused_by_name():
  source = _variables(np.zeros((2, 3), np.float32), np.zeros(3, np.float32))
  fresh = _variables(np.zeros((2, 3), np.float32), np.zeros(3, np.float32))
  fresh["params"]["conv0"]["kernel"] = np.zeros((3, 3, 3, 4), np.float32)
  with pytest.raises(ValueError, match=r"layer params/conv0/kernel has shape"):
    finetune.merge(fresh, source, ["a", "b", "c"], ["a", "b", "c"])
  fresh["params"]["conv9"] = fresh["params"].pop("conv0")
  with pytest.raises(ValueError, match="layers this model lacks \\(params/conv0"):
    finetune.merge(fresh, source, ["a", "b", "c"], ["a", "b", "c"])


def test_multipliers_scale_updates_and_frozen_layers_wait_to_unfreeze():
  tx = freezing.scale_updates(("b/.*",), ("a/.*=0.1",), unfreeze_step=2)
  updates = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(3)}, "c": {"w": jnp.ones(3)}}
  state = tx.init(updates)
  sizes = []
  for _ in range(3):
    scaled, state = tx.update(updates, state)
    sizes.append([float(scaled[k]["w"][0]) for k in "abc"])
  assert sizes == [
    [pytest.approx(0.1), 0.0, 1.0],
    [pytest.approx(0.1), 0.0, 1.0],
    [pytest.approx(0.1), 1.0, 1.0],
  ]
  adam = optax.chain(optax.adam(0.1), freezing.scale_updates((), ("a/.*=0.1",), 0))
  state = adam.init(updates)
  scaled, _ = adam.update(updates, state, updates)
  assert float(scaled["a"]["w"][0]) == pytest.approx(0.1 * float(scaled["c"]["w"][0]))


@pytest.fixture
def source_run(trained_workdir):
  """The shared tiny run (6 characters, 8 simulated devices) to start from."""
  return trained_workdir


def _fewer_characters(tiny_data_dir, tmp_path):
  """The tiny data with 4 of its 6 characters."""
  for name in synthetic.CHARACTERS[:4]:
    shutil.copytree(tiny_data_dir / name, tmp_path / "data" / name)
  return tmp_path / "data"


@pytest.mark.slow
def test_a_frozen_body_on_one_device_keeps_the_eight_device_weights(
  source_run, tiny_data_dir, tmp_path
):
  config = make_tiny_config(_fewer_characters(tiny_data_dir, tmp_path))
  config.finetune.init_from = f"{source_run}:latest"
  config.finetune.freeze = ("(?!logits/).*",)
  one_device = sharding.make_mesh(jax.devices()[:1])
  state, _ = train.train_and_evaluate(config, tmp_path / "run", mesh=one_device)
  source = trained_run.load(source_run, "latest").variables["params"]
  params = jax.device_get(state.params)
  for layer in ("conv0", "conv3", "dense1"):
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(params[layer][name], source[layer][name])
  # The head trained: 4 of the source's 6 columns, moved by the steps.
  assert params["logits"]["kernel"].shape[-1] == 4
  assert not np.array_equal(
    params["logits"]["kernel"], source["logits"]["kernel"][:, :4]
  )


@pytest.mark.slow
def test_a_fine_tuning_run_resumes_bitwise_and_reads_init_from_once(
  source_run, tiny_data_dir, tmp_path
):
  config = make_tiny_config(_fewer_characters(tiny_data_dir, tmp_path))
  config.finetune.init_from = str(source_run)
  config.finetune.lr_multipliers = ("conv.*=0.1",)
  whole, _ = train.train_and_evaluate(config, tmp_path / "whole")
  config.train.num_epochs = 1
  train.train_and_evaluate(config, tmp_path / "resumed")
  config.train.num_epochs = 2
  resumed, _ = train.train_and_evaluate(config, tmp_path / "resumed")
  for a, b in zip(
    jax.tree.leaves(jax.device_get(whole.params)),
    jax.tree.leaves(jax.device_get(resumed.params)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_another_model_family_is_refused(source_run, tiny_config, tmp_path):
  tiny_config.model.name = "resnet"
  tiny_config.finetune.init_from = str(source_run)
  with pytest.raises(
    ValueError, match="trained model=simpsons_cnn, this run model=resnet"
  ):
    train.train_and_evaluate(tiny_config, tmp_path)


@pytest.mark.parametrize("suffix", ["", ":99999"])
def test_init_from_mistakes_name_init_from(source_run, tiny_config, tmp_path, suffix):
  # A folder that holds no run; a step the source run never saved.
  source = str(source_run if suffix else tmp_path / "no_run") + suffix
  tiny_config.finetune.init_from = source
  with pytest.raises((FileNotFoundError, ValueError)) as raised:
    train.train_and_evaluate(tiny_config, tmp_path / "run")
  message = str(raised.value)
  assert message.startswith(f"--config.finetune.init_from={source}: ")
  assert "--workdir" not in message and "--checkpoint" not in message


def test_frozen_batchnorm_layers_keep_their_statistics():
  old = {
    "Block/BatchNorm_0": {"mean": jnp.zeros(2)},
    "BatchNorm_1": {"mean": jnp.zeros(2)},
  }
  new = jax.tree.map(lambda x: x + 1, old)
  # Freezing a layer's scale freezes its statistics; others take the new ones.
  kept = freezing.keep_frozen_stats(
    old, new, ("Block/BatchNorm_0/scale",), jnp.asarray(5), unfreeze_step=0
  )
  assert kept["Block/BatchNorm_0"]["mean"].tolist() == [0, 0]
  assert kept["BatchNorm_1"]["mean"].tolist() == [1, 1]
  later = freezing.keep_frozen_stats(
    old, new, ("Block/BatchNorm_0/scale",), jnp.asarray(5), unfreeze_step=5
  )
  assert later["Block/BatchNorm_0"]["mean"].tolist() == [1, 1]
