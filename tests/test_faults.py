"""Bad input, mistakes and non-finite losses: clear errors or counted skips."""

import errno
import functools
import importlib
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from simpsons_jax import (
  characters,
  checkpointing,
  config_checks,
  errors,
  evaluate,
  evaluators,
  files,
  image_files,
  predict,
  train,
)
from simpsons_jax import sharding as sharding_lib

ROOT = Path(__file__).resolve().parents[1]


def _reason(path, max_pixels=image_files.DEFAULT_MAX_PIXELS):
  """Why the data pipeline's read of `path` finds it unusable (None: usable)."""
  return image_files.read_image(path, max_pixels)[0].reason


def _frame(seed, size=(40, 30), mode="RGB"):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  return Image.fromarray(pixels).convert(mode)


def _good_jpeg_bytes(seed=0):
  path = Path(f"/tmp/_good_{os.getpid()}_{seed}.jpg")
  _frame(seed).save(path)
  data = path.read_bytes()
  path.unlink()
  return data


def _png(width, height, rows, pixels=None):
  """PNG bytes whose header says width x height, with only `rows` rows of data."""

  def chunk(kind, data):
    return (
      struct.pack(">I", len(data))
      + kind
      + data
      + struct.pack(">I", zlib.crc32(kind + data))
    )

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  raw = pixels if pixels is not None else bytes(rows * (1 + 3 * width))
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", header)
    + chunk(b"IDAT", zlib.compress(raw[: rows * (1 + 3 * width)]))
    + chunk(b"IEND", b"")
  )


def _write_bad_files(folder: Path) -> dict[str, str]:
  """Writes every kind of unusable file; returns name -> expected reason."""
  good = _good_jpeg_bytes()
  # IEND is there, half the rows are not: PIL loads it, TensorFlow does not.
  (folder / "rows_missing.png").write_bytes(_png(64, 48, rows=24))
  # 90 bytes that claim 20000 x 20000 pixels.
  (folder / "bomb.png").write_bytes(_png(20000, 20000, rows=1))
  (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(good)
  (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8)
  (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
  (folder / "empty.jpg").write_bytes(b"")
  (folder / "text.jpg").write_text("this is not an image\n")
  _frame(1).save(folder / "really_a_gif.png", format="GIF")
  (folder / "broken_link.jpg").symlink_to(folder / "does_not_exist.jpg")
  return {
    "rows_missing.png": "not a readable JPEG or PNG",
    "bomb.png": "over the pixel limit",
    os.fsdecode(b"caf\xe9.jpg"): "name is not valid UTF-8",
    "garbage.jpg": "not a readable JPEG or PNG",
    "truncated.jpg": "not a readable JPEG or PNG",
    "empty.jpg": "empty file",
    "text.jpg": "not a readable JPEG or PNG",
    "really_a_gif.png": "a GIF image, not a JPEG or PNG",
    "broken_link.jpg": "unreadable",
  }


def _write_odd_good_files(folder: Path) -> list[str]:
  """Unusual but valid images, named in unusual ways."""
  _frame(2, mode="RGBA").save(folder / "alpha.png")
  _frame(3).convert("P").save(folder / "palette.png")
  Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(
    folder / "sixteen_bit.png"
  )
  _frame(4, mode="L").save(folder / "gray.jpg")
  _frame(5, mode="CMYK").save(folder / "cmyk.jpg")
  Image.new("RGB", (6000, 4000), (250, 200, 20)).save(folder / "huge.jpg")
  Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "one_pixel.jpg")
  _frame(6).save(folder / "with spaces.JPG")
  _frame(7).save(folder / "Mr. Burns ü ñ 日本.jpeg")
  (folder / "link.jpg").symlink_to(folder / "gray.jpg")
  return [p.name for p in folder.iterdir()]


@pytest.fixture
def messy_dir(tmp_path):
  """A Kaggle-layout folder with every fault of a real download."""
  root = tmp_path / "simpsons_dataset"
  homer = root / "homer_simpson"
  homer.mkdir(parents=True)
  good = _write_odd_good_files(homer)
  for i in range(20):
    _frame(100 + i).save(homer / f"pic_{i:04d}.jpg")
  bad = _write_bad_files(homer)
  for name in ("Thumbs.db", ".DS_Store", "annotation.txt", "labels.csv"):
    (homer / name).write_text("x")
  (homer / "._pic_0000.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS fork.
  not_utf8 = root / os.fsdecode(b"b\xe4d_folder")
  not_utf8.mkdir()
  for i in range(6):
    _frame(300 + i).save(not_utf8 / f"pic_{i:04d}.jpg")
  (root / "bart_simpson" / ".thumbnails").mkdir(parents=True)
  _frame(8).save(root / "bart_simpson" / ".thumbnails" / "hidden.jpg")
  for i in range(12):
    _frame(200 + i).save(root / "bart_simpson" / f"pic_{i:04d}.jpg")
  (root / "empty_character").mkdir()
  (root / "rare_character").mkdir()
  _frame(9).save(root / "rare_character" / "pic_0000.jpg")
  (root / ".git").mkdir()
  return root, len(good) + 20, bad


def test_each_file_check_gives_its_reason(messy_dir):
  root, _, bad = messy_dir
  for name, reason in bad.items():
    assert _reason(root / "homer_simpson" / name).startswith(reason), name
  assert _reason(root / "homer_simpson" / "huge.jpg") is None
  assert _reason(root / "homer_simpson" / "sixteen_bit.png") is None


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
  path = tmp_path / "locked.jpg"
  _frame(0).save(path)
  real_open = open

  def refusing_open(file, *args, **kwargs):
    if Path(file) == path:
      raise PermissionError(13, "Permission denied")
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr("builtins.open", refusing_open)
  assert _reason(path) == "unreadable (Permission denied)"


@pytest.mark.slow
def test_training_on_a_messy_folder_skips_and_counts(messy_dir, tmp_path, tiny_config):
  root, num_good_homer, bad = messy_dir
  tiny_config.data.dir = str(root)
  tiny_config.data.min_images = 5
  tiny_config.train.num_epochs = 1
  tiny_config.train.batch_size = 8
  train.train_and_evaluate(tiny_config, tmp_path / "run")

  skipped = json.loads((tmp_path / "run" / "skipped_files.json").read_text())
  assert {Path(p).name: r.split(" (")[0] for p, r in skipped.items()} == bad
  cmap = characters.CharacterMap.load(tmp_path / "run" / "characters.json")
  assert cmap.names == ("bart_simpson", "homer_simpson")
  assert cmap.counts == (12, num_good_homer)
  # The saved split, which show_data and evaluate read, holds no skipped file.
  saved = json.loads((tmp_path / "run" / "split.json").read_text())
  used = {*saved["in_use"]["train"], *saved["in_use"]["val"]}
  assert len(used) == 12 + num_good_homer
  assert not {f"homer_simpson/{name}" for name in bad} & used
  assert evaluate.show_data(tmp_path / "run").exists()


def test_nothing_left_after_filtering_fails_before_training(tmp_path, tiny_config):
  (tmp_path / "data" / "bart").mkdir(parents=True)
  (tmp_path / "data" / "bart" / "pic_0000.jpg").write_bytes(b"")
  tiny_config.data.dir = str(tmp_path / "data")
  with pytest.raises(characters.DatasetError, match="min_images=1"):
    train.train_and_evaluate(tiny_config, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
  "key, value, message",
  [
    (
      "data.image_size",
      8,
      "image_size=8 is too small for model.name=simpsons_cnn .*16",
    ),
    ("data.val_fraction", 0.0, "val_fraction=0.0 must lie in \\(0, 1\\)"),
    ("data.val_fraction", 1.0, "val_fraction=1.0 must lie in \\(0, 1\\)"),
    ("data.min_images", 0, "min_images=0 must be at least 1"),
    ("train.batch_size", 12, "batch_size=12 does not split over 8 devices"),
    ("data.source", "kaggle", "source='kaggle' must be one of folder, synthetic"),
    ("optim.name", "rmsprop", "optim.name='rmsprop' must be one of adam, adamw, sgd"),
    ("optim.ema_decay", 1.0, "ema_decay=1.0 must lie in \\[0, 1\\)"),
    ("train.label_smoothing", -0.1, "label_smoothing=-0.1 must lie in \\[0, 1\\)"),
    ("train.mix", "mixcut", "mix='mixcut' must be one of none, mixup, cutmix"),
    ("train.mix_alpha", 0.0, "mix_alpha=0.0 must be positive"),
    ("model.simpsons_cnn.dropout_rate", 1.0, "dropout_rate=1.0 must lie in \\[0, 1\\)"),
    ("model.name", "vgg", "model.name='vgg' must be one of simpsons_cnn, resnet"),
    ("evals", {"x": {"type": "web"}}, "evals.x.type='web' must be one of validation"),
    ("evals", {"x": {"type": "folder"}}, "evals.x \\(type folder\\) needs dir"),
  ],
)
def test_impossible_values_fail_early(tiny_config, key, value, message):
  group, _, last = key.rpartition(".")
  owner = functools.reduce(getattr, group.split("."), tiny_config) if group else None
  owner = tiny_config if owner is None else owner
  owner[last] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  with pytest.raises(ValueError, match=message):
    more = evaluators.problems(tiny_config.evals)  # As training checks them.
    config_checks.check(tiny_config, sharding_lib.make_mesh(), more)


@pytest.mark.parametrize(
  "name", sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "default")
)
def test_every_config_passes_the_checks_and_gives_its_command(name):
  module = importlib.import_module(f"configs.{name}")
  config_checks.check(module.get_config(), sharding_lib.make_mesh())
  assert f"python main.py --config=configs/{name}.py" in module.__doc__


@pytest.mark.slow
@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.learning_rat=0.1", "learning_rate"),  # lists the valid keys
    ("--config.train.batch_size=big", "batch_size"),
  ],
)
def test_unknown_keys_and_wrong_types_are_rejected(override, message, tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "main.py",
      "--config=configs/demo.py",
      f"--workdir={tmp_path}",
      override,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_incompatible_workdir_is_refused_and_restart_archives(tiny_config, tmp_path):
  tiny_config.train.num_epochs = 1
  train.train_and_evaluate(tiny_config, tmp_path)
  first_checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

  tiny_config.data.image_size = 48
  with pytest.raises(ValueError, match="image_size: 32 -> 48.*restart=True"):
    train.train_and_evaluate(tiny_config, tmp_path)
  assert (
    sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == first_checkpoints
  )

  tiny_config.restart = True
  state, _ = train.train_and_evaluate(tiny_config, tmp_path)
  (archive,) = (tmp_path / "archive").iterdir()
  assert (
    sorted(p.name for p in (archive / "checkpoints").iterdir()) == first_checkpoints
  )
  assert checkpointing.load_config(archive).data.image_size == 32
  assert checkpointing.load_config(tmp_path).data.image_size == 48
  assert state.params["conv0"]["kernel"].shape == (3, 3, 3, 8)


@pytest.mark.slow
def test_longer_run_new_learning_rate_and_dtype_may_resume(tiny_config, tmp_path):
  tiny_config.train.num_epochs = 1
  train.train_and_evaluate(tiny_config, tmp_path)
  tiny_config.train.num_epochs = 2
  tiny_config.optim.learning_rate = 3e-4
  tiny_config.train.dtype = "bfloat16"  # float32 checkpoints load for bfloat16 compute
  state, _ = train.train_and_evaluate(tiny_config, tmp_path)
  assert int(state.step) == 2 * 6  # 96 training images in batches of 16


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
  tiny_config, tmp_path
):
  tiny_config.train.num_epochs = 1
  train.train_and_evaluate(tiny_config, tmp_path)
  good = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  tiny_config.train.num_epochs = 3
  tiny_config.optim.learning_rate = 1e30
  with pytest.raises(
    errors.UserError, match=f"at step .*checkpoint \\(step {good[-1]}\\)"
  ):
    train.train_and_evaluate(tiny_config, tmp_path)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == good


@pytest.mark.slow
def test_nothing_is_pickled(tiny_config, tmp_path):
  tiny_config.train.num_epochs = 1
  train.train_and_evaluate(tiny_config, tmp_path)
  for path in tmp_path.rglob("*"):
    if path.is_file():
      assert path.suffix not in (".pkl", ".pickle", ".npy"), path
      assert path.read_bytes()[:2] not in (b"\x80\x04", b"\x80\x05"), path


def test_require_accelerator_refuses_the_cpu(tiny_config, tmp_path):
  tiny_config.train.require_accelerator = True
  with pytest.raises(errors.UserError, match="JAX is running on the CPU.*jax\\[tpu\\]"):
    train.train_and_evaluate(tiny_config, tmp_path)


def _main(*args):
  return subprocess.run(
    [sys.executable, "main.py", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.slow
def test_a_missing_data_dir_is_one_sentence_without_traceback(tmp_path):
  result = _main(
    "--config=configs/full.py",
    f"--workdir={tmp_path / 'w'}",
    f"--config.data.dir={tmp_path / 'no_such_folder'}",
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert "error: Data folder" in result.stderr
  assert "--config.data.dir" in result.stderr


@pytest.mark.slow
def test_a_damaged_workdir_file_is_one_sentence_without_traceback(tmp_path):
  (tmp_path / "config.json").write_text('{"image_size": 12')  # Cut short.
  result = _main("--mode=evaluate", f"--workdir={tmp_path}")
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert f"error: {tmp_path / 'config.json'} is damaged" in result.stderr


def test_file_verdicts_are_kept_until_a_file_changes(messy_dir, tmp_path, monkeypatch):
  root, _, _ = messy_dir
  images = characters.find_images(root)
  first = image_files.keep_usable(images, tmp_path)
  reads = []
  real_read = image_files.read_image
  monkeypatch.setattr(
    image_files,
    "read_image",
    lambda path, *a: reads.append(path) or real_read(path, *a),
  )
  again = image_files.keep_usable(images, tmp_path)  # A resume reads no image again.
  assert again == first
  assert all(files.name_problem(p) or not p.exists() for p in reads)
  reads.clear()
  changed = root / "bart_simpson" / "pic_0003.jpg"
  changed.write_bytes(b"not a picture any more")
  third = image_files.keep_usable(images, tmp_path)
  assert [p for p in reads if p.exists() and not files.name_problem(p)] == [changed]
  assert changed not in third.images["bart_simpson"]


def test_the_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
  _frame(0).save(tmp_path / "frame.png")  # 40 x 30
  assert _reason(tmp_path / "frame.png", max_pixels=1200) is None
  decoded = []
  monkeypatch.setattr(image_files, "decode", decoded.append)
  reason = _reason(tmp_path / "frame.png", max_pixels=1199)
  assert reason == (
    "over the pixel limit (40x30 pixels, more than max_image_pixels=1,199)"
  )
  assert decoded == []


@pytest.mark.slow
def test_predict_exits_non_zero_when_anything_was_skipped_or_nothing_found(
  trained_workdir, tmp_path
):
  empty = tmp_path / "empty"
  empty.mkdir()
  nothing = predict.run(trained_workdir, [str(empty)])
  assert predict.incomplete(nothing, [str(empty)]) == (
    f"Nothing to classify: no image or video found in {empty}."
  )
  notes = tmp_path / "notes.jpg"
  notes.write_text("not a picture")
  frame = tmp_path / "frame.png"
  _frame(0).save(frame)
  result = _main(
    "--mode=predict", f"--workdir={trained_workdir}", str(notes), str(frame)
  )
  assert result.returncode == 2
  assert f"1 of 2 files skipped (see above): {notes}" in result.stderr
  # Everything classified: nothing to say, exit 0.
  done = predict.run(trained_workdir, [str(frame)])
  assert predict.incomplete(done, [str(frame)]) == ""


@pytest.mark.slow
def test_evaluate_refuses_an_unwritable_folder_before_loading(
  trained_workdir, tmp_path
):
  blocker = tmp_path / "file"
  blocker.write_text("")
  result = _main(
    "--mode=evaluate", f"--workdir={trained_workdir}", f"--output_dir={blocker}"
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert f"error: cannot write to {blocker}" in result.stderr
  assert "--output_dir" in result.stderr


def test_a_refused_write_is_one_sentence_naming_the_path_and_the_way_out(tmp_path):
  # A full disk or a read-only mount, as the OS reports it mid-run.
  import main

  error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt"))
  assert main._disk_error(error, "train") == (
    f"{tmp_path / 'ckpt'}: No space left on device (train): give --workdir a "
    "folder on a disk you can write to, with room to spare"
  )


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MB file system of its own (tmpfs), where this machine lets us mount."""
  mount = tmp_path / "disk"
  mount.mkdir()
  done = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
    capture_output=True,
    check=False,
  )
  if done.returncode != 0:
    pytest.skip(f"cannot mount a small file system here: {done.stderr.decode()[:200]}")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_training_at_once_and_the_run_resumes(
  tiny_config, small_disk, monkeypatch
):
  tiny_config.train.num_epochs = 4
  workdir = small_disk / "run"
  real_save, saves, failed_at = checkpointing.save, [], []

  def save_on_a_filling_disk(manager, state, meta, metrics):
    saves.append(int(state.step))
    if len(saves) == 2:  # The disk fills after the first checkpoint.
      manager.wait_until_finished()
      free = os.statvfs(small_disk)
      with open(small_disk / "ballast", "wb") as f:
        f.write(b"\0" * (free.f_bavail * free.f_frsize - 4096))
    real_save(manager, state, meta, metrics)
    while len(saves) == 2 and manager.is_saving_in_progress():
      time.sleep(0.01)  # The failing save ends before the next step, however slow.

  real_check = checkpointing.raise_failed_save

  steps = []

  def noting_the_step(manager, state, wait=False):
    steps.append(int(state.step))
    try:
      real_check(manager, state, wait)
    except checkpointing.SaveFailed:
      failed_at.append(int(state.step))
      raise

  monkeypatch.setattr(checkpointing, "save", save_on_a_filling_disk)
  monkeypatch.setattr(checkpointing, "raise_failed_save", noting_the_step)
  with pytest.raises(checkpointing.SaveFailed) as failure:
    train.train_and_evaluate(tiny_config, workdir)
  first, second = saves
  message = str(failure.value)
  assert message.startswith(f"Saving a checkpoint to {workdir / 'checkpoints'} failed:")
  assert "No space left on device (it needs about 0.5 MB, 0.0 MB free there)" in message
  assert f"The last good checkpoint, step {first}, is kept" in message
  assert failed_at[0] == second + 1  # The next step, not the next epoch.
  assert checkpointing.saved_steps(workdir / "checkpoints") == [first]

  (small_disk / "ballast").unlink()  # Room again: the same command resumes.
  monkeypatch.setattr(checkpointing, "save", real_save)
  steps.clear()
  state, _ = train.train_and_evaluate(tiny_config, workdir)
  assert steps[0] == first + 1  # From the last good checkpoint.
  assert int(state.step) == 4 * first  # Saved at the end of each epoch.
  assert checkpointing.saved_steps(workdir / "checkpoints")[-1] == 4 * first


@pytest.mark.slow
def test_an_unknown_config_key_is_one_line_with_the_closest_keys(tmp_path):
  result = _main(
    "--config=configs/demo.py", f"--workdir={tmp_path}", "--config.learning_rat=0.1"
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
    "error: --config.learning_rat is not a key of configs/demo.py: did you mean "
    "--config.optim.learning_rate? configs/default.py lists every key, with its meaning"
  ]
  for old, new in (
    ("data_dir", "data.dir"),
    ("dropout_rate", "model.resnet.dropout_rate"),
  ):
    result = _main(
      "--config=configs/strong.py", f"--workdir={tmp_path}", f"--config.{old}=1"
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
      f"error: --config.{old} is now --config.{new} (the config is nested since "
      "December 2026; configs/default.py lists every key)"
    ]
  result = _main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.zzz=1")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "--config.zzz is not a key of configs/demo.py" in result.stderr


@pytest.mark.slow
def test_tfds_mistakes_are_one_line_naming_the_users_flag(tmp_path):
  result = _main(
    "--config=configs/demo.py",
    f"--workdir={tmp_path / 'w'}",
    "--config.data.source=tfds:mnits",
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert "abstract_reasoning" not in result.stderr  # Not TFDS's list of all.
  assert (
    "error: tfds:mnits: TFDS has no data set 'mnits'; did you mean mnist"
    in result.stderr
  )
  assert not (tmp_path / "w").exists()  # Nor a train.lock.
  built = subprocess.run(
    [sys.executable, "-m", "simpsons_jax.tfds_builders.simpsons_characters"]
    + [f"--manual_dir={tmp_path / 'nope'}", f"--data_dir={tmp_path / 'tfds'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert built.returncode == 1
  assert "Traceback" not in built.stderr
  assert (
    f"error: Data folder {tmp_path / 'nope'} does not exist: point --manual_dir"
    in built.stderr
  )
  assert not (tmp_path / "tfds").exists()  # No empty folders left.
