"""Character selection, splits and the input pipeline."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simpsons_jax import characters, image_files, input_pipeline, splits
from simpsons_jax.data import core, folder


def _make_folder(root, counts, size=(20, 12)):
  """A Kaggle-layout folder with counts[name] small JPEGs per character."""
  for name, count in counts.items():
    (root / name).mkdir(parents=True)
    for i in range(count):
      colour = (i * 7 % 256, len(name) * 20 % 256, 99)
      Image.new("RGB", size, colour).save(root / name / f"pic_{i:04d}.jpg")
  return root


def test_min_images_filter_and_sorted_ids(tmp_path):
  root = _make_folder(tmp_path / "d", {"moe": 5, "bart": 3, "apu": 2, "lisa": 4})
  cmap = characters.select(characters.find_images(root), min_images=3)
  assert cmap.names == ("bart", "lisa", "moe")
  assert cmap.counts == (3, 4, 5)
  assert cmap.index("lisa") == 1


def test_image_listing_rules(tmp_path):
  folder = tmp_path / "homer"
  folder.mkdir()
  for name in (
    "a.JPG",
    "b.jpeg",
    "c.png",
    "d.PNG",
    ".hidden.jpg",
    "notes.txt",
    "x.gif",
  ):
    (folder / name).write_bytes(b"")
  (folder / "sub.jpg").mkdir()
  names = [p.name for p in characters.list_images(folder)]
  assert names == ["a.JPG", "b.jpeg", "c.png", "d.PNG"]


def test_kaggle_nesting_is_accepted(tmp_path):
  inner = _make_folder(tmp_path / "simpsons_dataset" / "simpsons_dataset", {"bart": 1})
  assert characters.resolve_data_dir(tmp_path / "simpsons_dataset") == inner
  assert characters.resolve_data_dir(tmp_path) == inner


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_unusable_data_dir_is_a_clear_error(tmp_path, kind):
  path = tmp_path / "data"
  if kind == "file":
    path.write_text("")
  elif kind == "empty":
    path.mkdir()
  with pytest.raises(characters.DatasetError, match="data_dir|min_images"):
    characters.select(characters.find_images(path), min_images=1)


def test_saved_map_is_reused_and_checked(tmp_path):
  root = _make_folder(tmp_path / "d", {"bart": 3, "lisa": 3})
  images = characters.find_images(root)
  first = characters.load_or_create(tmp_path / "w", images, 1)
  assert json.loads((tmp_path / "w" / "characters.json").read_text())["names"] == [
    "bart",
    "lisa",
  ]
  assert characters.load_or_create(tmp_path / "w", images, 1) == first
  _make_folder(root, {"marge": 3})
  with pytest.raises(characters.DatasetError, match="new: \\['marge'\\]"):
    characters.load_or_create(tmp_path / "w", characters.find_images(root), 1)


def _files(counts):
  """Path under the data folder -> a distinct hash, `counts` images per character."""
  names = tuple(f"c{i}" for i in range(len(counts)))
  current = {
    f"{names[i]}/f{j:03d}.jpg": f"{i}-{j}"
    for i, n in enumerate(counts)
    for j in range(n)
  }
  return current, names


def _per_character(paths, names):
  return [sum(p.startswith(f"{name}/") for p in paths) for name in names]


def test_split_is_stratified_disjoint_and_seeded():
  current, names = _files([100, 40, 20, 2])
  record = splits.decide(current, names, 0.05, 1.0, seed=0)
  assert _per_character(record.val, names) == [5, 2, 1, 1]
  assert len(record.train) + len(record.val) == len(current)
  assert not set(record.train) & set(record.val)
  again = splits.decide(current, names, 0.05, 1.0, seed=0)
  other = splits.decide(current, names, 0.05, 1.0, seed=1)
  assert again.val == record.val
  assert set(record.val) != set(other.val)


def test_every_character_keeps_a_training_image():
  current, names = _files([10, 1, 2])
  record = splits.decide(current, names, 0.9, 1.0, seed=0)
  assert _per_character(record.val, names) == [9, 0, 1]
  assert _per_character(record.train, names) == [1, 1, 1]


def test_train_fraction_takes_a_seeded_share_of_each_character():
  current, names = _files([300, 100])
  record = splits.decide(current, names, 0.05, 0.01, seed=0)
  assert _per_character(record.train, names) == [3, 1]
  assert splits.decide(current, names, 0.05, 0.01, seed=0) == record
  assert len(record.train) + len(record.unused) + len(record.val) == 400


def _decode(path):
  return core.resize(image_files.decode(tf.io.read_file(str(path))), 24).numpy()


def test_decode_any_mode_to_rgb_uint8(tmp_path):
  Image.new("L", (30, 10), 200).save(tmp_path / "gray.jpg")
  Image.new("RGBA", (7, 9), (255, 0, 0, 0)).save(tmp_path / "alpha.png")
  Image.new("P", (12, 12), 3).save(tmp_path / "palette.png")
  Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
  for name in ("gray.jpg", "alpha.png", "palette.png", "cmyk.jpg"):
    image = _decode(tmp_path / name)
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8, name
  red = _decode(tmp_path / "cmyk.jpg")
  assert red[..., 0].mean() > 200 and red[..., 1:].mean() < 60


def test_eval_batches_count_every_example_once(tmp_path):
  root = _make_folder(tmp_path / "d", {"bart": 6, "lisa": 7})
  images = characters.find_images(root)
  split = folder.Files.of(images, characters.select(images, 1))
  batches = core.eval_batches(split, image_size=8, batch_size=8)
  assert [b["image"].shape for b in batches] == [(8, 8, 8, 3)] * 2
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.tolist() == [1.0] * 13 + [0.0] * 3
  assert labels[:13].tolist() == [0] * 6 + [1] * 7


def test_train_batches_resume_where_they_stopped(tiny_config, tiny_data_dir):
  images = characters.find_images(tiny_data_dir)
  split = folder.Files.of(images, characters.select(images, 1))
  tiny_config.train.num_epochs = 3

  def labels(start):
    batches = input_pipeline.train_batches(split, tiny_config, start)
    return [b["label"].tolist() for b in batches]

  full = labels(0)
  steps_per_epoch = len(split) // 16
  assert len(full) == 3 * steps_per_epoch
  assert labels(steps_per_epoch + 2) == full[steps_per_epoch + 2 :]
  first_epoch = sorted(sum(full[:steps_per_epoch], []))
  assert len(set(map(tuple, full[:steps_per_epoch]))) == steps_per_epoch
  assert first_epoch != sorted(sum(full[steps_per_epoch : 2 * steps_per_epoch], []))
