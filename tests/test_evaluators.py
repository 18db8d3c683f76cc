"""Evaluator types: each owns its data and figures, and the loop and
`--mode=evaluate` get the same numbers from it; and the house rules that
come with them (no import-time side effects, hparams by dotted key)."""

import dataclasses
import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import simpsons_jax
from configs import default
from simpsons_jax import evaluate, evaluators, sharding, summary
from simpsons_jax import trained as trained_run

ROOT = Path(__file__).resolve().parents[1]


def _model_and_context(workdir, report_dir):
  trained = trained_run.load(workdir)
  mesh = sharding.make_mesh()
  score = evaluators.scorer(mesh, trained.model.apply, trained.cmap.num_classes)
  model = evaluators.Model(
    score,
    trained.variables,
    mesh,
    trained.step,
    trained.calibration,
    trained.open_set,
  )
  context = evaluators.Context(trained.config, trained.cmap, workdir, report_dir)
  return model, context


@pytest.fixture(scope="module")
def others(trained_workdir, tiny_data_dir, tmp_path_factory):
  """A folder of a character the run never learned (another name for one
  it knows: the name is all that makes it unknown)."""
  folder = tmp_path_factory.mktemp("others")
  shutil.copytree(tiny_data_dir / "clown", folder / "nelson_muntz")
  return folder


def test_calibration_and_unknowns_are_types_that_evaluate_reproduces(
  trained_workdir, others, tmp_path, monkeypatch
):
  model, context = _model_and_context(trained_workdir, tmp_path / "checks")
  known = evaluators.create("validation", {"type": "validation"}, context)
  context = dataclasses.replace(context, known=known)
  scored = []
  accumulate = evaluators.scoring.accumulate
  monkeypatch.setattr(
    evaluators.scoring,
    "accumulate",
    lambda *args: scored.append(1) or accumulate(*args),
  )
  calibration = evaluators.create("cal", {"type": "calibration"}, context).run(model)
  unknown = evaluators.create(
    "unk", {"type": "unknowns", "dir": str(others)}, context
  ).run(model)
  # Each data set is scored once, however many evaluators read it.
  assert len(scored) == 2
  report = evaluate.run(trained_workdir, output_dir=tmp_path, unknown_dir=str(others))
  assert calibration.report == report["calibration"]
  assert unknown.report == report["unknown"]
  assert unknown.report["unknown_images"] == 20
  assert set(unknown.scalars) >= {"auroc.max_probability", "auroc.energy"}
  assert (
    calibration.scalars["ece.calibrated"] == report["calibration"]["ece"]["calibrated"]
  )


def test_a_type_is_a_registered_name_or_an_evaluator_class():
  said = evaluators.problems(
    {
      "a": {"type": "nope"},
      "b": {"type": "simpsons_jax.files:as_path"},
      "c": {"type": "no_such_module:Thing"},
      "d": {"type": "unknowns"},
      "e": {"type": "simpsons_jax.evaluators.calibration:Calibration"},
    }
  )
  assert said[0].startswith("evals.a.type='nope' must be one of validation, folder")
  assert "is not an evaluator" in said[1]
  assert "no module 'no_such_module'" in said[2]
  assert said[3] == "evals.d (type unknowns) needs dir"
  assert len(said) == 4  # A class named by its module is a type too.


@pytest.mark.slow
def test_importing_any_module_leaves_matplotlib_and_tfds_as_they_were():
  """Every module of the package imported in a fresh process: matplotlib's
  backend stays the caller's choice, and no TFDS builder is registered."""
  names = [
    m.name
    for m in pkgutil.walk_packages(simpsons_jax.__path__, "simpsons_jax.")
    if "tfds_builders" not in m.name
    and not m.name.rpartition(".")[2].startswith("_")  # __main__, the extension.
  ]
  probe = (
    "import matplotlib; matplotlib.use('svg'); import importlib, sys\n"
    f"for name in {names!r}: importlib.import_module(name)\n"
    "import tensorflow_datasets as tfds\n"
    "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
    "assert 'simpsons_characters' not in tfds.list_builders()\n"
  )
  subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)
  assert importlib.import_module("simpsons_jax.plots")  # And here too.


def test_tensorboard_hparams_have_dotted_keys():
  found = summary.hparams(default.get_config())
  assert found["train.num_epochs"] == 70
  assert found["data.image_size"] == 128
  assert found["model.simpsons_cnn.conv_features"] == "(8, 16, 32, 64)"
  assert found["seed"] == 0
  assert not any(isinstance(v, dict) for v in found.values())
  assert "train" not in found and "model" not in found
