"""Trains the Simpsons character classifier.

  python main.py --config=configs/demo.py --workdir=runs/demo
  python main.py --config=configs/full.py --workdir=runs/full \
      --config.data_dir=~/data/simpsons_dataset

Running again with the same --workdir resumes the run.
"""

import logging as logging_lib

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Configuration file, e.g. configs/full.py.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, summaries and the map.")
flags.DEFINE_enum("mode", "train", ["train"], "What to do with the workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record: logging_lib.LogRecord) -> bool:
  """Drops Orbax's per-save INFO lines; its warnings and errors still show."""
  return record.levelno >= logging_lib.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  import tensorflow as tf

  # tf.data only feeds the host; keep TensorFlow off the accelerators.
  tf.config.set_visible_devices([], "GPU")
  from simpsons_jax import train

  logging.info("Config:\n%s", FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
