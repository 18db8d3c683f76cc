"""Workdirs of the flat config (before December 2026) read as today's.

`data/flat_config_9c54064.json` is the `config.json` that main at 9c54064
(the last flat-config commit) wrote for `make_tiny_config`, with one folder
evaluator; DATA_DIR stands for the data folder.
"""

import json
import shutil
from pathlib import Path

import pytest

from simpsons_jax import checkpointing, config_upgrade, evaluate, export, models, train
from simpsons_jax import trained as trained_run
from tests.conftest import make_tiny_config

FLAT = json.loads((Path(__file__).parent / "data/flat_config_9c54064.json").read_text())


def _plain(config) -> dict:
  """A config as JSON sees it (tuples as lists)."""
  return json.loads(
    json.dumps(config.to_dict() if hasattr(config, "to_dict") else config)
  )


def test_the_flat_config_becomes_todays_nested_one():
  expected = make_tiny_config("DATA_DIR")
  expected.evals.kaggle_test = {"type": "folder", "dir": "DATA_DIR", "every_epochs": 2}
  expected = _plain(expected)
  del expected["model"]["resnet"]  # The run never used another model's settings.
  expected["data"]["negatives_val_share"] = 0.0  # What runs before it split by.
  assert _plain(config_upgrade.upgrade(FLAT, models.registered_settings())) == expected


def test_todays_config_is_left_as_it_is():
  config = make_tiny_config("DATA_DIR")
  assert _plain(
    config_upgrade.upgrade(_plain(config), models.registered_settings())
  ) == _plain(config)


def test_keys_an_older_run_never_had_get_the_values_it_ran_with():
  older = {
    k: v for k, v in FLAT.items() if k not in ("cpu_kernels", "augment", "evals")
  }
  older = {**older, "model": "resnet", "stem_features": 16}
  del older["checkpoint_metric"], older["exclude_copies_of"]
  config = config_upgrade.upgrade(older, models.registered_settings())
  assert config.train.cpu_kernels == "onednn"
  assert config.ckpt.metric == "accuracy"
  assert config.data.exclude_copies_of == ""
  assert config.augment.crop_min_area == 1.0 and config.evals.to_dict() == {}
  assert config.model.name == "resnet"
  assert _plain(config.model.resnet) == {
    "stem_features": 16,
    "stem_pool": False,
    "stage_features": [32, 64, 128],
    "blocks_per_stage": 1,
    "dropout_rate": 0.4,  # The flat run's dropout_rate, now the resnet's own.
  }
  assert "simpsons_cnn" not in config.model


def test_a_key_of_a_newer_version_is_one_sentence():
  with pytest.raises(ValueError, match=r"keys this version does not know \(zzz\)"):
    config_upgrade.upgrade({**FLAT, "zzz": 1}, models.registered_settings())


@pytest.mark.slow
def test_a_flat_workdir_resumes_evaluates_and_exports(tiny_data_dir, tmp_path):
  """A run trained before the change (its config.json flat) continues with
  today's config, and evaluate and export read it."""
  config = make_tiny_config(tiny_data_dir)
  config.train.num_epochs = 1
  train.train_and_evaluate(config, tmp_path)
  flat = {**FLAT, "data_dir": str(tiny_data_dir), "num_epochs": 1, "evals": {}}
  (tmp_path / "config.json").write_text(json.dumps(flat, indent=2))
  shutil.rmtree(tmp_path / "eval", ignore_errors=True)

  loaded = checkpointing.load_config(tmp_path)
  assert loaded.data.dir == str(tiny_data_dir) and loaded.train.num_epochs == 1
  before = evaluate.run(tmp_path, checkpoint="latest")
  assert before["checkpoint_step"] == trained_run.load(tmp_path, "latest").step
  export.run(tmp_path, formats=("jax",))
  assert list((tmp_path / "export").glob("*/model.json"))

  config.train.num_epochs = 2  # Resumes: nothing that fixes the run changed.
  state, _ = train.train_and_evaluate(config, tmp_path)
  assert int(state.step) == 2 * before["checkpoint_step"]
  assert "data" in json.loads((tmp_path / "config.json").read_text())


def test_a_nested_config_of_the_last_release_is_read_unchanged():
  """config.json as main at 7217eff (before the saved config was checked)
  wrote it: every key known, every type right, nothing dropped; the keys
  added since get the values that run trained with (no negatives)."""
  path = Path(__file__).parent / "data/nested_config_7217eff.json"
  saved = json.loads(path.read_text())
  loaded = _plain(config_upgrade.upgrade(saved, models.registered_settings()))
  assert loaded["data"].pop("negatives") == ""
  assert loaded["data"].pop("negatives_val_share") == 0.0
  assert loaded["data"].pop("unknown_share") == 0.2
  assert loaded["train"].pop("negatives_weight") == 2.0
  assert loaded == saved
