"""Data sources: a TFDS data set built by the project's builder trains like
the folder it was built from."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simpsons_jax import data, errors, sharding, train
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core
from tests.conftest import make_tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tfds_dir(tiny_data_dir, tmp_path_factory):
  """The tiny folder built into TFDS shards by the project's build command."""
  out = tmp_path_factory.mktemp("tfds")
  subprocess.run(
    [
      sys.executable,
      "-m",
      "simpsons_jax.tfds_builders.simpsons_characters",
      f"--manual_dir={tiny_data_dir}",
      f"--data_dir={out}",
    ],
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=300,
  )
  return out


def _tfds_config(tiny_data_dir, tfds_dir):
  config = make_tiny_config(tiny_data_dir)
  config.data.source = "tfds:simpsons_characters"
  config.data.tfds_dir = str(tfds_dir)
  return config


def _pixels(examples):
  """(label, image bytes) of every example, sorted."""
  return sorted(
    (int(label), image.tobytes())
    for batch in core.eval_batches(examples, 32, 16)
    for image, label, mask in zip(
      batch["image"], batch["label"], batch["mask"], strict=True
    )
    if mask
  )


def test_tfds_source_splits_and_decodes_like_the_folder(
  tiny_data_dir, tfds_dir, tmp_path
):
  folder_config = make_tiny_config(tiny_data_dir)
  tfds_config = _tfds_config(tiny_data_dir, tfds_dir)
  cmap_f, train_f, val_f = data.create(folder_config).prepare(tmp_path / "folder")
  cmap_t, train_t, val_t = data.create(tfds_config).prepare(tmp_path / "tfds")
  assert cmap_t == cmap_f
  for name in ("split.json", "characters.json"):
    assert (tmp_path / "tfds" / name).read_text() == (
      tmp_path / "folder" / name
    ).read_text()
  assert len(train_t) == len(train_f) and len(val_t) == len(val_f)
  assert sorted(val_t.labels.tolist()) == sorted(val_f.labels.tolist())
  # The same bytes through the same decoder: the same pixels, image by image.
  assert _pixels(val_f) == _pixels(val_t)
  # Read back by another process (load), the split is the same.
  _, train_l, val_l = data.create(tfds_config).load(tmp_path / "tfds")
  np.testing.assert_array_equal(train_l.indices, train_t.indices)
  np.testing.assert_array_equal(val_l.labels, val_t.labels)
  assert val_t.frames([0])[0].ndim == 3
  # The pixels the figures explain are the ones the model is fed, in the
  # order asked, repeats included.
  chosen = [5, 0, 17, 5]
  for examples in (val_f, val_t):
    fed = [x["image"] for x in examples.decoded(32).as_numpy_iterator()]
    np.testing.assert_array_equal(
      examples.model_inputs(chosen, 32), np.stack([fed[i] for i in chosen])
    )


@pytest.mark.slow
def test_training_from_tfds_scores_validation_like_evaluate(
  tiny_data_dir, tfds_dir, tmp_path
):
  from simpsons_jax import evaluate

  config = _tfds_config(tiny_data_dir, tfds_dir)
  _, metrics = train.train_and_evaluate(config, tmp_path)
  result = evaluate.run(tmp_path, checkpoint="latest")
  assert result["num_examples"] == 24
  assert result["accuracy"] == pytest.approx(metrics["accuracy"])
  assert (tmp_path / "eval" / "validation" / "predictions.png").exists()


def test_an_unprepared_tfds_data_set_is_one_clear_error(tiny_config, tmp_path):
  tiny_config.data.source = "tfds:simpsons_characters"
  tiny_config.data.tfds_dir = str(tmp_path / "empty")
  with pytest.raises(errors.UserError, match="not prepared .* --manual_dir"):
    train.train_and_evaluate(tiny_config, tmp_path / "run", sharding.make_mesh())


def test_a_tfds_split_is_scored_like_the_folder_it_was_built_from(
  trained_workdir, tiny_data_dir, tfds_dir, tmp_path
):
  from simpsons_jax import evaluate, evaluators

  trained = trained_run.load(trained_workdir)
  config, cmap = trained.config, trained.cmap
  assert evaluate.evaluated("tfds:simpsons_characters:1.0.0/train", config) == (
    "simpsons_characters_1.0.0_train",
    {"type": "tfds", "name": "simpsons_characters:1.0.0", "split": "train"},
  )
  with pytest.raises(ValueError, match="write tfds:NAME"):
    evaluate.evaluated("tfds:simpsons_characters", config)
  spec = {"type": "tfds", "name": "simpsons_characters", "split": "train"}
  spec["data_dir"] = str(tfds_dir)
  mesh = sharding.make_mesh()
  score = evaluators.scorer(mesh, trained.model.apply, cmap.num_classes)
  model = evaluators.Model(score, trained.variables, mesh, trained.step)

  def context(name):
    return evaluators.Context(config, cmap, trained_workdir, tmp_path / name)

  reports = [
    evaluators.create(name, spec, context(name)).run(model).report
    for name, spec in (
      ("tfds", spec),
      ("folder", {"type": "folder", "dir": str(tiny_data_dir)}),
    )
  ]
  assert reports[0]["num_examples"] == reports[1]["num_examples"] == 120
  assert reports[0]["confusion_matrix"] == reports[1]["confusion_matrix"]
  with pytest.raises(ValueError, match="has no split 'test'; its splits: train"):
    evaluators.create("t", {**spec, "split": "test"}, context("t")).run(model)
