"""--mode=export: each artifact runs without simpsons_jax and equals predict."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from simpsons_jax import explain, export, image_files, predict, serve, train
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core
from tests.conftest import make_tiny_config

ROOT = Path(__file__).resolve().parents[1]

# The artifacts are loaded by fresh processes that never import this package.
LOAD_JAX = """
import sys
import jax, numpy as np
jax.config.update("jax_enable_x64", False)
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
images = np.load(sys.argv[2])
out = [np.asarray(exported.call(images[:n])) for n in (1, len(images))]
np.save(sys.argv[3], out[1])
assert np.allclose(out[0], out[1][:1], atol=1e-6)  # Any batch size.
assert "simpsons_jax" not in sys.modules
"""

LOAD_SAVEDMODEL = """
import json, sys
import numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
paths = json.loads(sys.argv[2])
served = model.signatures["serving_default"](
  image_bytes=tf.constant([open(p, "rb").read() for p in paths])
)
np.save(sys.argv[3], served["all_probabilities"].numpy())
json.dump(
  [[c.decode() for c in row] for row in served["characters"].numpy()],
  open(sys.argv[4], "w"),
)
direct = model.signatures["probabilities"](images=tf.constant(np.load(sys.argv[5])))
np.save(sys.argv[6], direct["output_0"].numpy())
assert "simpsons_jax" not in sys.modules
"""


EXPLAIN_JAX = """
import sys
import jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
images, targets = np.load(sys.argv[2]), np.load(sys.argv[3])
np.save(sys.argv[4], np.asarray(exported.call(images, targets)))
assert "simpsons_jax" not in sys.modules
"""

LOAD_TFLITE = """
import sys
import numpy as np, tensorflow as tf
interpreter = tf.lite.Interpreter(model_path=sys.argv[1])
images = np.load(sys.argv[2])
run = interpreter.get_signature_runner()
out = run(images=images)
np.save(sys.argv[3], next(iter(out.values())))
assert "simpsons_jax" not in sys.modules
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_data_dir):
  config = make_tiny_config(tiny_data_dir)
  config.test_time_flip = True  # The test-time flip travels inside the artifacts.
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(config, workdir)
  return workdir, export.run(workdir)


def _run(script: str, *args) -> None:
  env = {**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
  result = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
    capture_output=True,
    text=True,
    env=env,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]


def _frames(tiny_data_dir):
  return sorted(tiny_data_dir.glob("*/*.jpg"))[::13][:7]


def _images(paths):
  """uint8 (N, 32, 32, 3): decoded and resized as predict does."""
  return np.stack(
    [core.resize(image_files.read_image(p)[1], 32).numpy() for p in paths]
  )


def _expected(workdir, paths):
  trained = trained_run.load(workdir)
  results = list(
    predict.classify_stream(trained, paths, top_k=trained.cmap.num_classes)
  )
  names = trained.cmap.names
  probs = np.array(
    [
      [next(t["probability"] for t in r["top"] if t["character"] == n) for n in names]
      for r in results
    ]
  )
  return trained, probs


@pytest.mark.slow
def test_export_writes_the_artifacts_and_a_model_card(exported):
  workdir, written = exported
  trained = trained_run.load(workdir)
  assert written.folder == workdir / "export" / str(trained.step)
  assert written.formats == ("jax", "savedmodel", "tflite")
  assert os.path.getsize(written.folder / "model.jax") > 0
  assert os.path.getsize(written.folder / "model.tflite") > 0
  assert (written.folder / "saved_model" / "saved_model.pb").exists()
  names = json.loads((written.folder / "characters.json").read_text())
  assert tuple(names) == trained.cmap.names
  card = json.loads((written.folder / "model.json").read_text())
  assert card["image_size"] == 32
  assert card["test_time_flip"] is True
  assert card["checkpoint_step"] == trained.step
  # The artifacts hold the fitted temperature (their answers equal predict's).
  assert card["calibration"]["temperature"] == trained.temperature != 1.0
  assert card["validation"]["accuracy"] == trained.meta["val"]["accuracy"]
  assert card["versions"]["jax"] == __import__("jax").__version__


@pytest.mark.slow
@pytest.mark.parametrize(
  "artifact, loader", [("model.jax", LOAD_JAX), ("model.tflite", LOAD_TFLITE)]
)
def test_uint8_artifacts_equal_predict_in_a_process_without_simpsons_jax(
  exported, tiny_data_dir, tmp_path, artifact, loader
):
  workdir, written = exported
  paths = _frames(tiny_data_dir)
  _, expected = _expected(workdir, paths)
  np.save(tmp_path / "images.npy", _images(paths))
  _run(loader, written.folder / artifact, tmp_path / "images.npy", tmp_path / "p.npy")
  np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, atol=1e-5)


@pytest.mark.slow
def test_explain_jax_draws_the_maps_of_the_run_without_simpsons_jax(
  exported, tiny_data_dir, tmp_path
):
  workdir, written = exported
  trained = trained_run.load(workdir)
  images = _images(_frames(tiny_data_dir))
  targets = np.arange(len(images), dtype=np.int32) % trained.cmap.num_classes
  np.save(tmp_path / "images.npy", images)
  np.save(tmp_path / "targets.npy", targets)
  _run(
    EXPLAIN_JAX,
    written.folder / "explain.jax",
    tmp_path / "images.npy",
    tmp_path / "targets.npy",
    tmp_path / "maps.npy",
  )
  expected = explain.explainer(
    trained.config, trained.cmap.num_classes, trained.variables
  )(images, targets)["grad_cam"]
  assert expected.shape == (len(images), 32, 32) and expected.max() == 1.0
  np.testing.assert_allclose(np.load(tmp_path / "maps.npy"), expected, atol=1e-5)


@pytest.mark.slow
def test_savedmodel_takes_image_bytes_and_equals_predict(
  exported, tiny_data_dir, tmp_path
):
  workdir, written = exported
  paths = _frames(tiny_data_dir)
  trained, expected = _expected(workdir, paths)
  np.save(tmp_path / "images.npy", _images(paths))
  _run(
    LOAD_SAVEDMODEL,
    written.folder / "saved_model",
    json.dumps([str(p) for p in paths]),
    tmp_path / "served.npy",
    tmp_path / "names.json",
    tmp_path / "images.npy",
    tmp_path / "direct.npy",
  )
  np.testing.assert_allclose(np.load(tmp_path / "served.npy"), expected, atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / "direct.npy"), expected, atol=1e-5)
  top = json.loads((tmp_path / "names.json").read_text())
  assert [row[0] for row in top] == [
    trained.cmap.names[i] for i in expected.argmax(axis=1)
  ]
  assert len(top[0]) == 3


@pytest.mark.slow
def test_an_unknown_format_is_one_sentence(exported):
  workdir, _ = exported
  with pytest.raises(ValueError, match="--formats: onnx unknown; choose from jax, "):
    export.run(workdir, formats=["jax", "onnx"])


def _printed(stdout: str) -> dict[str, list[tuple[str, float]]]:
  """The examples' lines: path name=probability name=probability ..."""
  rows = {}
  for line in stdout.strip().splitlines():
    path, *pairs = line.split(" ")
    rows[path] = [(n, float(p)) for n, p in (pair.split("=") for pair in pairs)]
  return rows


@pytest.mark.slow
@pytest.mark.parametrize(
  "script, target, exact",
  [
    ("run_saved_model.py", "saved_model", True),
    ("run_tflite.py", "", True),
    ("run_model_jax.py", "", False),  # Pillow's JPEG decoder: a few levels off.
  ],
)
def test_the_examples_print_what_predict_says(
  exported, tiny_data_dir, script, target, exact
):
  workdir, written = exported
  paths = _frames(tiny_data_dir)[:3]
  expected = list(predict.classify_stream(trained_run.load(workdir), paths, top_k=3))
  result = subprocess.run(
    [sys.executable, str(ROOT / "examples" / script), str(written.folder / target)]
    + [str(p) for p in paths],
    capture_output=True,
    text=True,
    env={**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "2"},
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  printed = _printed(result.stdout)
  for path, want in zip(paths, expected, strict=True):
    got = printed[str(path)]
    want = [(t["character"], t["probability"]) for t in want["top"]]
    if exact:
      assert [n for n, _ in got] == [n for n, _ in want]
      np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-4)
    else:
      assert {n for n, _ in got} <= set(trained_run.load(workdir).cmap.names)
      probs = dict(got)
      for name, p in want:
        if name in probs:
          assert abs(probs[name] - p) < 0.05


@pytest.mark.slow
def test_a_new_export_replaces_the_folder_whole_and_lists_its_files(exported, tmp_path):
  workdir, _ = exported
  out = tmp_path / "out"
  full = export.run(workdir, formats=["jax", "savedmodel"], output_dir=str(out))
  assert (full.folder / "saved_model").is_dir()
  only_jax = export.run(workdir, formats=["jax"], output_dir=str(out))
  assert only_jax.folder == full.folder
  # Nothing of the first export is left beside the second, nor a temporary.
  assert sorted(p.name for p in full.folder.iterdir()) == [
    "characters.json",
    "explain.jax",
    "model.jax",
    "model.json",
    "unknown.jax",  # The run's unknown score (open_set.json).
  ]
  assert [p.name for p in out.iterdir()] == [full.folder.name]
  card = export.verify(only_jax.folder)
  assert card["formats"] == ["jax"]
  assert card["run"] == os.fspath(workdir)
  assert card["checkpoint_step"] == int(full.folder.name)
  assert sorted(card["files"]) == [
    "characters.json",
    "explain.jax",
    "model.jax",
    "unknown.jax",
  ]


@pytest.mark.slow
def test_a_failed_export_leaves_the_previous_one_as_it_was(
  exported, tmp_path, monkeypatch
):
  workdir, _ = exported
  out = tmp_path / "out"
  before = export.run(workdir, formats=["jax"], output_dir=str(out))
  listing = sorted(p.name for p in before.folder.iterdir())

  def fails(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(export, "export_savedmodel", fails)
  with pytest.raises(OSError, match="No space"):
    export.run(workdir, output_dir=str(out))
  assert sorted(p.name for p in before.folder.iterdir()) == listing
  assert [p.name for p in out.iterdir()] == [before.folder.name]
  export.verify(before.folder)


@pytest.mark.slow
def test_a_folder_that_does_not_match_its_model_json_is_refused(exported, tmp_path):
  workdir, _ = exported
  written = export.run(workdir, formats=["jax"], output_dir=str(tmp_path / "good"))
  for fault in ("stray", "missing", "changed"):
    folder = tmp_path / fault
    shutil.copytree(written.folder, folder)
    if fault == "stray":  # A file of another export, e.g. an older 32 px one.
      (folder / "model.tflite").write_bytes(b"old")
    elif fault == "missing":  # Cut short.
      (folder / "model.jax").unlink()
    else:
      (folder / "characters.json").write_text('["someone", "else"]')
    with pytest.raises(export.ExportMismatch, match="export the run again"):
      export.verify(folder)
    with pytest.raises(export.ExportMismatch):
      serve.load(folder)
  example = ROOT / "examples" / "run_model_jax.py"
  result = subprocess.run(
    [sys.executable, str(example), str(tmp_path / "stray"), "x.jpg"],
    capture_output=True,
    text=True,
    env={**os.environ, "XLA_FLAGS": ""},
    check=False,
  )
  assert result.returncode != 0
  assert "model.tflite does not match model.json" in result.stderr


@pytest.mark.slow
def test_an_unwritable_output_folder_is_named_before_any_work(exported, tmp_path):
  workdir, _ = exported
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=f"cannot write to {blocker}/sub.*--output_dir"):
    export.run(workdir, output_dir=str(blocker / "sub"))
