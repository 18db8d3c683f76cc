"""Evaluation reports, figures and prediction on a trained tiny run."""

import hashlib
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from simpsons_jax import (
  answers,
  characters,
  evaluate,
  evaluators,
  files,
  plots,
  predict,
  train,
)
from simpsons_jax import trained as trained_run
from tests.conftest import make_tiny_config


def test_report_on_hand_built_sums():
  names = ("bart", "homer", "lisa")
  confusion = np.array([[2, 1, 0], [1, 1, 0], [1, 0, 2]], np.float32)
  totals = {
    "loss_sum": np.float32(6.0),
    "correct": np.float32(5),
    "top3_correct": np.float32(8),
    "count": np.float32(8),
    "confusion": confusion,
  }
  result = evaluators.report(totals, names)
  assert result["num_examples"] == 8
  assert result["accuracy"] == 5 / 8
  assert result["top3_accuracy"] == 1.0
  assert result["loss"] == 6.0 / 8
  assert result["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 0, 2]]
  assert result["per_class"]["bart"] == {
    "precision": 0.5,
    "recall": 2 / 3,
    "f1": pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)),
    "support": 3.0,
  }
  assert result["per_class"]["lisa"]["precision"] == 1.0
  assert result["per_class"]["lisa"]["recall"] == 2 / 3
  f1 = [result["per_class"][n]["f1"] for n in names]
  assert result["macro_f1"] == pytest.approx(np.mean(f1))
  assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


@pytest.mark.parametrize(
  "filename, character",
  [
    ("abraham_grampa_simpson_12.jpg", "abraham_grampa_simpson"),
    ("homer_simpson_0.JPG", "homer_simpson"),
    ("moe_szyslak_47.png", "moe_szyslak"),
    ("no_number.jpg", None),
    ("12.jpg", None),
  ],
)
def test_kaggle_test_set_file_names(filename, character):
  assert characters.parse_test_filename(filename) == character


def test_figures_are_written(tmp_path):
  frames = []
  for i, (size, mode) in enumerate([((40, 30), "RGB"), ((20, 50), "L"), ((9, 9), "P")]):
    frames.append(tmp_path / f"f{i}.png")
    Image.new(mode, size, 100).save(frames[-1])
  image = plots.prediction_grid(
    [str(f) for f in frames],
    ["bart", "lisa", "homer_simpson"],
    ["bart", "bart", "homer_simpson"],
    [0.9, 0.6, 0.99],
    tmp_path / "grid.png",
    "title",
  )
  assert (tmp_path / "grid.png").stat().st_size > 1000
  assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
  confusion = np.array([[5, 1], [0, 3]])
  plots.confusion_matrix(confusion, ["bart", "lisa"], tmp_path / "cm.png")
  assert (tmp_path / "cm.png").stat().st_size > 1000


def test_evaluate_validation_split(trained_workdir):
  result = evaluate.run(trained_workdir)
  out = trained_workdir / "eval" / "validation"
  saved = json.loads((out / "report.json").read_text())
  assert saved["num_examples"] == 24  # 20 % of 20 images, 6 characters
  assert saved["skipped"] == 0
  assert saved["accuracy"] == result["accuracy"]
  assert sum(map(sum, saved["confusion_matrix"])) == 24
  assert {p.name for p in out.glob("*.png")} >= {
    "predictions.png",
    "confusion_matrix.png",
  }


@pytest.mark.slow
def test_evaluate_kaggle_layouts_and_unknown_characters(
  trained_workdir, tiny_data_dir, tmp_path
):
  flat = tmp_path / "kaggle_simpson_testset"
  flat.mkdir()
  for name in ("clown", "spiky_kid"):
    for i in range(3):
      shutil.copy(tiny_data_dir / name / f"pic_{i:04d}.jpg", flat / f"{name}_{i}.jpg")
  shutil.copy(
    tiny_data_dir / "clown" / "pic_0005.jpg", flat / "apu_nahasapeemapetilon_7.jpg"
  )
  result = evaluate.run(trained_workdir, str(flat), checkpoint="latest")
  assert result["num_examples"] == 6
  assert result["skipped"] == 1
  assert result["unknown_characters"] == {"apu_nahasapeemapetilon": 1}
  assert result["per_class"]["clown"]["support"] == 3
  assert (trained_workdir / "eval" / "kaggle_simpson_testset" / "report.json").exists()

  nested = evaluate.run(trained_workdir, str(tiny_data_dir))
  assert nested["num_examples"] == 120


def test_predict_any_image_mode_and_size(trained_workdir, tiny_data_dir, tmp_path):
  with Image.open(tiny_data_dir / "clown" / "pic_0001.jpg") as image:
    image.convert("L").save(tmp_path / "gray.jpg")
    image.convert("RGBA").resize((301, 77)).save(tmp_path / "odd.png")
    image.convert("P").save(tmp_path / "palette.png")
  output = tmp_path / "out.jsonl"
  results = predict.run(trained_workdir, [str(tmp_path)], top_k=2, output=str(output))
  assert [r["path"].split("/")[-1] for r in results] == [
    "gray.jpg",
    "odd.png",
    "palette.png",
  ]
  for r in results:
    assert len(r["top"]) == 2
    assert r["top"][0]["probability"] >= r["top"][1]["probability"]
  assert [json.loads(line) for line in output.read_text().splitlines()] == results
  sure = predict.run(trained_workdir, [str(tmp_path / "odd.png")], threshold=1.0)
  assert sure[0]["character"] == answers.UNKNOWN


def test_show_data(trained_workdir):
  path = evaluate.show_data(trained_workdir)
  assert os.path.getsize(path) > 1000


@pytest.fixture
def copied_workdir(trained_workdir, tmp_path):
  """A copy of the trained run that a test may damage."""
  return shutil.copytree(trained_workdir, tmp_path / "copy")


def test_a_reordered_map_or_an_edited_image_size_is_refused(copied_workdir):
  path = copied_workdir / "characters.json"
  saved = json.loads(path.read_text())
  path.write_text(json.dumps({**saved, "names": saved["names"][::-1]}))
  with pytest.raises(ValueError, match="characters .* are not characters.json's"):
    trained_run.load(copied_workdir)
  path.write_text(json.dumps(saved))
  config = json.loads((copied_workdir / "config.json").read_text())
  config["data"]["image_size"] = 64
  (copied_workdir / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="image_size=32, config.json says 64"):
    evaluate.run(copied_workdir)


@pytest.mark.parametrize(
  "damaged", ["characters.json", "config.json", "split.json", "meta"]
)
def test_damaged_json_is_one_error_naming_the_file(copied_workdir, damaged):
  if damaged == "meta":
    path = next((copied_workdir / "checkpoints").glob("*/meta/metadata"))
  else:
    path = copied_workdir / damaged
  path.write_text(path.read_text()[:20])  # Truncated, as by a full disk.
  with pytest.raises(files.DamagedFileError, match=f"{path.parent.name}|{damaged}"):
    if damaged == "meta":
      trained_run.load(copied_workdir, path.parents[1].name)
    else:
      evaluate.run(copied_workdir)


@pytest.mark.slow
def test_evaluate_with_output_dir_writes_nothing_into_the_workdir(
  trained_workdir, tmp_path, capsys
):
  def snapshot():
    return {
      p: (p.stat().st_size, p.stat().st_mtime_ns) for p in trained_workdir.rglob("*")
    }

  before = snapshot()
  out = tmp_path / "out" / "validation"
  out.mkdir(parents=True)
  (out / "mismatches.png").write_bytes(b"an older evaluation's")
  (out / "old_extra.png").write_bytes(b"stale")
  result = evaluate.run(trained_workdir, output_dir=tmp_path / "out")
  assert snapshot() == before
  assert list((tmp_path / "out" / "tensorboard" / "eval_validation").iterdir())
  assert result["num_examples"] == 24
  # The console names the step; the report lists its own figures, whole.
  step = result["checkpoint_step"]
  assert (
    f"validation, checkpoint step {step} (best): accuracy" in capsys.readouterr().out
  )
  assert json.loads((out / "report.json").read_text()) == result
  written = {
    p.name: hashlib.sha256(p.read_bytes()).hexdigest()
    for p in out.glob("*.png")
    if p.name != "old_extra.png"  # Not evaluate's: kept, and not listed.
  }
  assert result["figures"] == written
  assert "predictions.png" in written and (out / "old_extra.png").exists()
  assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in written)
  assert not list(out.glob(".*.tmp"))


def test_predict_reports_bad_files_and_classifies_the_rest(
  trained_workdir, tiny_data_dir, tmp_path
):
  folder = tmp_path / "mine"
  (folder / "real").mkdir(parents=True)
  shutil.copy(tiny_data_dir / "clown" / "pic_0001.jpg", folder / "real" / "a.jpg")
  (folder / "linked").symlink_to(folder / "real")  # Walked once, as given.
  (folder / "real" / "loop").symlink_to(folder)  # Never walked twice.
  (folder / "real" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS.
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff nothing more")
  (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"")
  results = list(
    predict.classify_stream(
      trained_run.load(trained_workdir), [folder, tmp_path / "missing.jpg"]
    )
  )
  by_name = {r["path"].replace(f"{tmp_path}/", ""): r for r in results}
  assert list(by_name) == [
    "mine/broken.jpg",
    "mine/caf\\xe9.jpg",
    "mine/linked/a.jpg",
    "mine/real/a.jpg",
    "missing.jpg",
  ]
  assert by_name["mine/linked/a.jpg"]["top"] == by_name["mine/real/a.jpg"]["top"]
  assert by_name["mine/broken.jpg"]["error"].startswith("not a readable JPEG or PNG")
  assert by_name["mine/caf\\xe9.jpg"]["error"].startswith("name is not valid UTF-8")
  assert by_name["missing.jpg"]["error"].endswith("missing.jpg does not exist")


def test_predict_output_keeps_what_was_done_before_an_interruption(
  trained_workdir, tiny_data_dir, tmp_path, monkeypatch
):
  paths = sorted((tiny_data_dir / "clown").glob("*.jpg"))[:5]
  calls = []
  real_forward = trained_run._jitted

  def forward_then_stop(*args):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real_forward(*args)

  monkeypatch.setattr(trained_run, "_jitted", forward_then_stop)
  output = tmp_path / "out.jsonl"
  with pytest.raises(KeyboardInterrupt):
    predict.run(trained_workdir, paths, output=str(output), batch_size=2)
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["path"] for r in lines] == [str(p) for p in paths[:4]]


@pytest.mark.slow
def test_an_extra_evaluator_reports_every_epoch_and_evaluate_reproduces_it(
  tiny_data_dir, tmp_path
):
  config = make_tiny_config(tiny_data_dir)
  config.train.num_epochs = 2
  config.evals.kaggle_test = ml_collections.ConfigDict(
    {"type": "folder", "dir": str(tiny_data_dir), "every_epochs": 1}
  )
  train.train_and_evaluate(config, tmp_path)
  path = tmp_path / "eval" / "kaggle_test" / "report.json"
  during = json.loads(path.read_text())
  assert during["checkpoint_step"] == 12 and during["num_examples"] == 120
  events = list((tmp_path / "tensorboard" / "eval_kaggle_test").iterdir())
  assert len(events) == 2  # One per epoch.
  after = evaluate.run(tmp_path, eval_dir="kaggle_test", checkpoint="12")
  # The same metrics (evaluate also draws figures, and lists them, and adds
  # the calibration figures).
  extra = ("name", "figures", "calibration", "scalars")
  assert {k: v for k, v in after.items() if k not in extra} == {
    k: v for k, v in during.items() if k not in extra
  }
  assert during["scalars"].items() <= after["scalars"].items()
  assert json.loads(path.read_text()) == after
