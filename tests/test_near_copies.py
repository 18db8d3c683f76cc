"""Near-copies of another set's images are left out of a run's data."""

import json

import numpy as np
import pytest
from conftest import make_tiny_config

from simpsons_jax import data, synthetic
from simpsons_jax.data import near_copies


def _save(image, path, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **kwargs)


def _sets(tmp_path):
  """A reference folder of full-size frames and a training folder holding
  28 px JPEG copies of three of them among 15 other frames."""
  rng = np.random.default_rng(0)
  reference, training = tmp_path / "frames", tmp_path / "train"
  copied = []
  for name in synthetic.CHARACTERS[:3]:
    for i in range(6):
      frame = synthetic.render(name, rng)
      if i < 2:
        _save(frame, reference / name / f"frame_{i}.png")
      if i == 0:
        _save(frame.resize((28, 28)), training / name / "copy.jpg", quality=75)
        copied.append(f"{name}/copy.jpg")
      elif i >= 2:
        _save(frame.resize((28, 28)), training / name / f"other_{i}.jpg")
  return reference, training, sorted(copied)


def test_exactly_the_shrunk_copies_are_left_out(tmp_path):
  reference, training, copied = _sets(tmp_path)
  source = data.create(make_tiny_config(training))
  source.config.data.exclude_copies_of = str(reference)
  workdir = tmp_path / "run"
  _, train, val = source.prepare(workdir)

  used = {str(p).removeprefix(f"{training}/") for p in [*train.paths, *val.paths]}
  assert len(used) == 12 and not used & set(copied)
  report = json.loads((workdir / near_copies.REPORT_FILENAME).read_text())
  assert [p.removeprefix(f"{training}/") for p in report["left_out"]] == copied


def test_nothing_is_left_out_without_a_copy(tmp_path):
  reference, training, _ = _sets(tmp_path)
  others = sorted(training.rglob("other_*.jpg"))
  found = near_copies.copies(
    near_copies.thumbnails(sorted(reference.rglob("*.png"))),
    near_copies.thumbnails(others),
  )
  assert found.size == 0


def test_a_tfds_source_refuses_exclude_copies_of(tiny_config):
  tiny_config.data.source = "tfds:simpsons_characters"
  tiny_config.data.exclude_copies_of = "frames"
  with pytest.raises(ValueError, match="applies to folders of image files"):
    data.create(tiny_config)
