"""Shared fixtures. Eight CPU devices are simulated for every test."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

from configs import default  # noqa: E402
from simpsons_jax import synthetic  # noqa: E402

# Real Simpsons frames (read-only); tests that need them skip without them.
SHARED_DATA = Path(
  os.environ.get(
    "SIMPSONS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
  )
)


def shared_data(*parts: str) -> Path:
  """A folder of ../shared/data, or a skip when this machine lacks it."""
  path = SHARED_DATA.joinpath(*parts)
  if not path.is_dir():
    pytest.skip(f"{path} is absent (set SIMPSONS_SHARED_DATA to the shared data)")
  return path


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
  """Six synthetic characters of 20 images each, in the Kaggle layout."""
  root = tmp_path_factory.mktemp("tiny") / "simpsons_dataset"
  return synthetic.generate(root, images_per_character=20)


def make_tiny_config(data_dir: Path):
  """The default config shrunk to run in seconds on a tiny folder."""
  config = default.get_config()
  config.data.dir = str(data_dir)
  config.data.min_images = 1
  config.data.image_size = 32
  config.data.val_fraction = 0.2
  config.model.simpsons_cnn.dense_features = (64, 64)
  config.train.batch_size = 16
  config.train.num_epochs = 2
  config.train.log_every_steps = 2
  return config


@pytest.fixture
def tiny_config(tiny_data_dir):
  return make_tiny_config(tiny_data_dir)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, tiny_data_dir):
  """A tiny run trained for two epochs on 8 simulated devices (tests read it;
  a test that damages a workdir works on a copy)."""
  from simpsons_jax import train

  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(make_tiny_config(tiny_data_dir), workdir)
  return workdir
