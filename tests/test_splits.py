"""The split is decided once per workdir and kept: nothing validates twice-seen."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from simpsons_jax import data, errors, evaluate, splits, synthetic
from tests.conftest import make_tiny_config, shared_data


@pytest.fixture
def folder(tmp_path, tiny_data_dir):
  """A copy of the tiny data folder that a test may change."""
  return shutil.copytree(tiny_data_dir, tmp_path / "data")


def _names(split):
  return sorted("/".join(p.split("/")[-2:]) for p in split.paths)


def _new_image(path, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), np.uint8)
  Image.fromarray(pixels).save(path)


def test_a_resumed_run_keeps_its_validation_files_whatever_the_folder_does(
  folder, tmp_path
):
  config = make_tiny_config(folder)
  workdir = tmp_path / "run"
  _, train, val = data.create(config).prepare(workdir)
  val_before, train_before = _names(val), _names(train)
  homer = synthetic.CHARACTERS[0]
  homer_val = [n for n in val_before if n.startswith(homer)]
  homer_train = [n for n in train_before if n.startswith(homer)]

  for i in range(5):  # New files: before, this moved validation images.
    _new_image(folder / homer / f"new_{i}.jpg", seed=i)
  _new_image(folder / homer_val[1], seed=99)  # A validation file changes,
  _new_image(folder / homer_train[0], seed=98)  # and a training file changes.
  shutil.copy(folder / homer_val[2], folder / homer / "copy_of_val.jpg")
  shutil.copy(folder / homer_val[0], folder / homer / "copy_of_missing_val.jpg")
  (folder / homer_val[0]).unlink()  # Its copy never trains: it may come back.
  _, train, val = data.create(config).prepare(workdir)

  assert _names(val) == sorted(set(val_before) - {homer_val[0], homer_val[1]})
  assert _names(train) == sorted(
    {*train_before, *(f"{homer}/new_{i}.jpg" for i in range(5))}
  )
  copies = {f"{homer}/copy_of_val.jpg", f"{homer}/copy_of_missing_val.jpg"}
  assert not {homer_val[1], *copies} & set(_names(train))
  # The decision stays on disk: the changed validation file never trains.
  _, train, again = data.create(config).prepare(workdir)
  assert _names(again) == _names(val) and homer_val[1] not in _names(train)
  # evaluate scores exactly the files the run validates on.
  validation = data.create(config).validation(workdir, None)
  assert _names(validation) == _names(val)


def test_copies_stay_on_one_side_and_conflicting_labels_never_validate(
  folder, tmp_path, caplog
):
  config = make_tiny_config(folder)
  config.data.val_fraction = 0.5
  for name in synthetic.CHARACTERS[:3]:  # Three copies of each image.
    for path in sorted((folder / name).glob("pic_*.jpg")):
      shutil.copy(path, path.with_name(f"copy_a_{path.name}"))
      shutil.copy(path, path.with_name(f"copy_b_{path.name}"))
  first, last = synthetic.CHARACTERS[0], synthetic.CHARACTERS[-1]
  conflicts = sorted((folder / first).glob("pic_*.jpg"))[:4]
  for path in conflicts:  # The same picture under two characters.
    shutil.copy(path, folder / last / f"from_{first}_{path.name}")
  with caplog.at_level("WARNING"):
    _, train, val = data.create(config).prepare(tmp_path / "run")
  record = json.loads((tmp_path / "run" / "split.json").read_text())
  sides = {}
  for side in ("train", "val"):
    for sha in record[side].values():
      sides.setdefault(sha, set()).add(side)
  assert all(len(s) == 1 for s in sides.values())
  val_hashes = set(record["val"].values())
  for path in conflicts:
    assert record["train"][f"{first}/{path.name}"] not in val_hashes
  assert "4 image(s) filed under more than one character" in caplog.text
  assert len(train) + len(val) == 6 * 20 + 3 * 40 + 4


def test_no_split_ever_validates_on_a_training_image():
  """Random histories of changes keep validation and training apart."""
  rng = np.random.default_rng(0)
  names = ("a", "b", "c")
  for trial in range(30):
    current = {f"{rng.choice(names)}/{i}.jpg": str(rng.integers(40)) for i in range(60)}
    record = splits.decide(current, names, 0.3, 1.0, seed=trial)
    for later in range(3):
      for path in rng.choice(list(current), 10, replace=False):
        current[path] = str(rng.integers(40))  # Changed, perhaps into a copy.
      for i in range(5):
        current[f"{rng.choice(names)}/new_{later}_{i}.jpg"] = str(rng.integers(40))
      in_use, _ = splits.reconcile(record, current)
      assert not set(in_use.val.values()) & set(in_use.train.values())
      assert not set(in_use.val) & set(in_use.train)
      assert set(in_use.val) <= set(record.val)
      record = splits.Record({**record.train, **in_use.train}, record.val, {})


def test_real_frames_with_duplicates_split_apart(tmp_path):
  """The real frames hold byte-identical pairs: each pair lands on one side."""
  config = make_tiny_config(shared_data("frames", "train"))
  config.data.val_fraction = 0.3
  data.create(config).prepare(tmp_path)
  record = json.loads((tmp_path / "split.json").read_text())
  hashes = [*record["train"].values(), *record["val"].values()]
  assert len(hashes) - len(set(hashes)) >= 2
  assert not set(record["train"].values()) & set(record["val"].values())


def test_evaluate_and_show_data_refuse_a_workdir_without_a_saved_split(tmp_path):
  (tmp_path / "config.json").write_text(make_tiny_config(tmp_path).to_json())
  (tmp_path / "characters.json").write_text('{"names": ["a"], "counts": [1]}')
  with pytest.raises(errors.UserError, match="split.json is missing"):
    evaluate.show_data(tmp_path)
