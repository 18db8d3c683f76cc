"""The examples of docs/extending.md, run as written."""

import json
import re
import sys
from pathlib import Path

import pytest

from simpsons_jax import data, synthetic
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core
from tests.conftest import make_tiny_config

EXTENDING = (Path(__file__).resolve().parents[1] / "docs/extending.md").read_text()


def _block(first_line: str) -> str:
  """The Python block of docs/extending.md that starts with `first_line`."""
  blocks = re.findall(r"```python\n(.*?)```", EXTENDING, re.S)
  return next(b for b in blocks if b.startswith(first_line))


def test_the_csv_data_source_of_the_readme(tiny_data_dir, tmp_path, monkeypatch):
  (tmp_path / "my_sources.py").write_text(_block("# my_sources.py"))
  monkeypatch.syspath_prepend(str(tmp_path))
  registry_line = re.search(r'^  "csv": "(.*)",$', _block("SOURCES = {"), re.M)
  monkeypatch.setitem(data.SOURCES, "csv", registry_line[1])
  table = tmp_path / "frames.csv"
  rows = [
    f"{path.relative_to(tiny_data_dir.parent)},{name}"
    for name in synthetic.CHARACTERS[:3]
    for path in sorted((tiny_data_dir / name).glob("*.jpg"))
  ]
  table.write_text("\n".join(rows) + "\n")
  (tmp_path / tiny_data_dir.name).symlink_to(tiny_data_dir)
  config = make_tiny_config(tiny_data_dir)
  config.data.source = f"csv:{table}"
  cmap, train, val = data.create(config).prepare(tmp_path / "run")
  assert cmap.names == tuple(sorted(synthetic.CHARACTERS[:3]))
  assert (len(train), len(val)) == (48, 12)
  _, again, _ = data.create(config).load(tmp_path / "run")
  assert list(again.paths) == list(train.paths)
  batches = core.eval_batches(val, 32, 16)
  assert sum(b["mask"].sum() for b in batches) == 12
  del sys.modules["my_sources"]


@pytest.mark.slow
def test_the_model_of_the_readme_trains_resumes_and_predicts(
  tiny_data_dir, tmp_path, monkeypatch
):
  from simpsons_jax import models, train

  (tmp_path / "my_models.py").write_text(_block("# my_models.py"))
  monkeypatch.syspath_prepend(str(tmp_path))
  import my_models

  registry_line = re.search(r'^  "(\w+)": (\w+),$', _block("MODELS = {"), re.M)
  monkeypatch.setitem(
    models.MODELS, registry_line[1], getattr(my_models, registry_line[2])
  )
  config = make_tiny_config(tiny_data_dir)  # configs/default.py, unedited.
  assert config.model.tiny_conv.to_dict() == {"features": 16, "kernel_size": 3}
  config.model.name = "tiny_conv"
  config.model.tiny_conv.features = 8
  config.train.num_epochs = 1
  train.train_and_evaluate(config, tmp_path / "run")
  config.train.num_epochs = 2
  state, _ = train.train_and_evaluate(config, tmp_path / "run")
  assert models.count_params(state.params) == (3 * 3 * 3 * 8 + 8) + (8 * 6 + 6)
  trained = trained_run.load(tmp_path / "run")
  assert isinstance(trained.model, my_models.TinyConvNet)
  assert trained.model.features == 8
  config.model.tiny_conv.features = 16  # Fixes the parameter shapes.
  with pytest.raises(ValueError, match="model.tiny_conv.features: 8 -> 16"):
    train.train_and_evaluate(config, tmp_path / "run")
  del sys.modules["my_models"]


@pytest.mark.slow
def test_the_evaluator_of_the_readme_scores_during_training_and_evaluate(
  tiny_data_dir, tmp_path, monkeypatch
):
  from simpsons_jax import evaluate, train

  (tmp_path / "my_evaluators.py").write_text(_block("# my_evaluators.py"))
  monkeypatch.syspath_prepend(str(tmp_path))
  config_lines = _block("config.evals.listed = dict(")
  listed = (
    [  # Four images of each of two characters, and one it never saw.
      (path, name)
      for name in synthetic.CHARACTERS[:2]
      for path in sorted((tiny_data_dir / name).glob("*.jpg"))[:4]
    ]
    + [
      (
        sorted((tiny_data_dir / synthetic.CHARACTERS[2]).glob("*.jpg"))[0],
        "nelson_muntz",
      )
    ]
  )
  table = tmp_path / "frames.csv"
  table.write_text("".join(f"{path},{name}\n" for path, name in listed))
  config = make_tiny_config(tiny_data_dir)
  config.train.num_epochs = 1
  exec(config_lines, {"config": config})  # The docs' config lines, as written.
  config.evals.listed.table = str(table)
  config.evals.listed.every_epochs = 1
  train.train_and_evaluate(config, tmp_path / "run")
  during = json.loads((tmp_path / "run/eval/listed/report.json").read_text())
  assert (during["num_examples"], during["skipped"]) == (8, 1)
  assert during["unknown_characters"] == {"nelson_muntz": 1}
  after = evaluate.run(tmp_path / "run", eval_dir="listed", checkpoint="latest")
  assert after["accuracy"] == during["accuracy"]
  hardest = json.loads((tmp_path / "run/eval/hardest/report.json").read_text())
  assert hardest["hardest"] in synthetic.CHARACTERS
  assert 0 <= hardest["scalars"]["hardest_recall"] <= 1
  again = evaluate.run(tmp_path / "run", eval_dir="hardest", checkpoint="latest")
  assert again["hardest"] == hardest["hardest"]
  assert after["confusion_matrix"] == during["confusion_matrix"]
  del sys.modules["my_evaluators"]
