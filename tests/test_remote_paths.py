"""Workdirs and data on a file system that is not local (gs:// and the like).

TensorFlow's in-memory file system, `ram://`, stands in for `gs://`: both are
reached through `tf.io.gfile`, by TensorFlow's own ops (tf.data reading
images, TensorBoard's writer) and by `etils.epath`, whose `gs://` backend is
`tf.io.gfile` wherever TensorFlow is installed. The fixture below routes
`ram://` through that same backend (one difference made good: writing over a
`ram://` file appends, where an object store replaces the object); everything
else is the code a `gs://` workdir runs.
"""

import json
import os
import uuid

import pytest
import tensorflow as tf
from conftest import make_tiny_config
from etils import epath
from etils.epath import backend, gpath, register

from simpsons_jax import (
  checkpointing,
  evaluate,
  files,
  run_folder,
  synthetic,
  train,
)
from simpsons_jax import trained as trained_run


class _ObjectStore(backend._TfBackend):
  """tf.io.gfile, replacing a file written over as GCS replaces an object."""

  def open(self, path, mode):
    if "w" in mode and self.exists(path):
      self.remove(path)
    return super().open(path, mode)


@pytest.fixture
def remote(monkeypatch):
  """A fresh `ram://` folder that epath reaches as it reaches `gs://`."""
  monkeypatch.setattr(gpath, "_URI_PREFIXES", (*gpath._URI_PREFIXES, "ram://"))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  store = _ObjectStore()
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", store)
  monkeypatch.setattr(backend, "tf_backend", store)  # What epath picks with TF.
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
  root = f"ram://bucket-{uuid.uuid4().hex}"
  assert files.as_path(root)._backend is store
  yield root
  if tf.io.gfile.exists(root):
    tf.io.gfile.rmtree(root)


def _local_checkpoints(monkeypatch, folder):
  """Orbax writes arrays through TensorStore, whose GCS driver cannot be
  faked here: only the checkpoints stay local (Orbax's own tests cover gs://)."""
  monkeypatch.setattr(
    checkpointing, "checkpoint_dir", lambda workdir: epath.Path(folder)
  )


def test_paths_keep_their_file_system():
  assert os.fspath(files.as_path("gs://bucket/run") / "config.json") == (
    "gs://bucket/run/config.json"
  )
  assert os.fspath(checkpointing.checkpoint_dir("gs://bucket/run")) == (
    "gs://bucket/run/checkpoints"
  )
  assert os.fspath(checkpointing.checkpoint_dir("runs/x")) == os.path.abspath(
    "runs/x/checkpoints"
  )
  assert os.fspath(files.as_path("~/data")) == os.path.expanduser("~/data")
  assert not files.is_local("gs://bucket/run") and files.is_local("runs/x")


@pytest.mark.slow
def test_a_run_on_a_remote_file_system_trains_as_a_local_one(
  remote, trained_workdir, tmp_path, monkeypatch, caplog
):
  data = synthetic.generate(f"{remote}/data", images_per_character=20)
  assert tf.io.gfile.exists(f"{remote}/data/bald_dad/pic_0000.jpg")
  _local_checkpoints(monkeypatch, tmp_path / "checkpoints")
  workdir = f"{remote}/run"
  train.train_and_evaluate(make_tiny_config(data), workdir)

  assert "is not on a local disk and has no file locks" in caplog.text
  for name in ("config.json", "characters.json", "split.json", "file_checks.json"):
    assert tf.io.gfile.exists(f"{workdir}/{name}"), name
  assert tf.io.gfile.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
  assert not os.path.exists("ram:"), "a remote path was written as a local one"
  # The same pixels, split and steps as the local run: the same model.
  local = json.loads((trained_workdir / "split.json").read_text())
  assert json.loads(tf.io.gfile.GFile(f"{workdir}/split.json").read()) == local
  assert (
    trained_run.load(workdir).meta["val"]
    == trained_run.load(trained_workdir).meta["val"]
  )

  # Resuming reads the run back from the remote workdir.
  config = make_tiny_config(data)
  config.train.num_epochs = 3
  train.train_and_evaluate(config, workdir)
  assert trained_run.load(workdir, "latest").meta["epoch"] == 3


@pytest.mark.slow
def test_evaluation_reports_go_to_a_remote_folder(remote, trained_workdir, tmp_path):
  out = f"{remote}/reports"
  local = evaluate.run(trained_workdir, output_dir=tmp_path)
  result = evaluate.run(trained_workdir, output_dir=out)
  assert result["accuracy"] == local["accuracy"]
  saved = json.loads(tf.io.gfile.GFile(f"{out}/validation/report.json").read())
  assert saved["confusion_matrix"] == local["confusion_matrix"]
  assert tf.io.gfile.glob(f"{out}/validation/*.png")
  assert tf.io.gfile.glob(f"{out}/tensorboard/eval_validation/events.out.tfevents.*")


def test_restart_moves_a_remote_run_to_its_archive(remote, tiny_config):
  workdir = files.as_path(f"{remote}/run")
  workdir.mkdir(parents=True)
  checkpointing.save_config(workdir, tiny_config)
  (workdir / "tensorboard").mkdir()
  (workdir / "tensorboard" / "events").write_text("x")
  tiny_config.restart = True
  with run_folder.lock(workdir):
    run_folder.prepare(tiny_config, workdir)
  (archive,) = (workdir / "archive").iterdir()
  assert sorted(p.name for p in archive.iterdir()) == ["config.json", "tensorboard"]
  assert (archive / "tensorboard" / "events").read_text() == "x"
  assert not (workdir / "config.json").exists()


def test_a_damaged_remote_file_is_one_clear_error(remote):
  path = f"{remote}/run/config.json"
  files.as_path(path).parent.mkdir(parents=True)
  files.write_text_atomic(path, "{not json")
  with pytest.raises(files.DamagedFileError, match=f"{path} is damaged"):
    checkpointing.load_config(f"{remote}/run")
