"""Whole epochs: the input pipeline alone, and full training beside Keras `fit`.

  python benchmarks/epochs.py --data_dir=../shared/data/simpsons-mnist/train
  python benchmarks/epochs.py --data_dir=... --image_size=64 --json=epochs.json
  python benchmarks/epochs.py --image_size=64 --epochs=70 --nodemo   # accuracy parity

Four figures, each from a fresh process:
- the input pipeline alone: images/s of the first epoch (decoding the JPEGs)
  and of the second (from the cache);
- `configs/full.py` through `main.py` for two epochs: the second epoch's
  seconds, validation and checkpoint included (from the log's timestamps);
- the same network in Keras, `fit` on the same split from the same cached
  tf.data pipeline with per-epoch validation: the second epoch's seconds;
- with `--epochs=70` (the notebook's run), both frameworks' validation accuracy
  after the last epoch on the same split: is the port faithful?
- the demo end to end (`--nodemo` skips it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "data_dir", str(ROOT.parent / "shared/data/simpsons-mnist/train"), ""
)
flags.DEFINE_integer("image_size", 128, "Image size.")
flags.DEFINE_integer("epochs", 2, "Epochs each framework trains (at least 2).")
flags.DEFINE_string("json", "", "Also write the results to this file.")
flags.DEFINE_bool("demo", True, "Also time the demo end to end.")
flags.DEFINE_string("worker", "", "Internal: pipeline or keras.")


def _config():
  from configs import full

  config = full.get_config()
  config.data.dir = FLAGS.data_dir
  config.data.min_images = 1
  config.data.image_size = FLAGS.image_size
  config.train.num_epochs = FLAGS.epochs
  return config


def _splits(config):
  from simpsons_jax import data

  with tempfile.TemporaryDirectory() as workdir:
    return data.create(config).prepare(Path(workdir))


def _pipeline() -> dict:
  """Images/s of the training input pipeline alone, epoch 1 and epoch 2."""
  from simpsons_jax import input_pipeline

  config = _config()
  _, train, _ = _splits(config)
  steps = len(train) // config.train.batch_size
  times, start = [], time.perf_counter()
  for i, _ in enumerate(input_pipeline.train_batches(train, config), 1):
    if i % steps == 0:
      times.append(time.perf_counter() - start)
      start = time.perf_counter()
  images = steps * config.train.batch_size
  return {
    "decode_epoch_images_per_second": images / times[0],
    "cached_epoch_images_per_second": images / times[1],
  }


def _keras() -> dict:
  """Seconds of Keras `fit`'s second epoch, validation included, and the last
  epoch's validation accuracy."""
  import keras
  import tensorflow as tf

  config = _config()
  keras.utils.set_random_seed(config.seed)
  cmap, train, val = _splits(config)
  size = config.data.image_size
  layers = [keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 255)]
  for features in config.model.simpsons_cnn.conv_features:
    layers += [
      keras.layers.Conv2D(features, 3, padding="same", activation="relu"),
      keras.layers.MaxPooling2D(),
    ]
  layers.append(keras.layers.Flatten())
  for features in config.model.simpsons_cnn.dense_features:
    layers += [
      keras.layers.Dropout(config.model.simpsons_cnn.dropout_rate),
      keras.layers.Dense(features, activation="relu"),
    ]
  layers += [
    keras.layers.Dropout(config.model.simpsons_cnn.dropout_rate),
    keras.layers.Dense(cmap.num_classes),
  ]
  model = keras.Sequential(layers)
  model.compile(
    keras.optimizers.Adam(config.optim.learning_rate),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )

  def batches(split, shuffle):
    ds = split.decoded(size)
    ds = ds.map(lambda e: (tf.cast(e["image"], tf.float32), e["label"]))
    if shuffle:
      ds = ds.shuffle(len(split), seed=0)
    return ds.batch(config.train.batch_size, drop_remainder=shuffle).prefetch(2)

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      if epoch == 1:
        self.seconds = time.perf_counter() - self.start

  timer = Timer()
  history = model.fit(
    batches(train, True),
    validation_data=batches(val, False),
    epochs=config.train.num_epochs,
    verbose=0,
    callbacks=[timer],
  )
  return {
    "keras_epoch2_seconds": timer.seconds,
    "keras_val_accuracy": history.history["val_accuracy"][-1],
  }


def _simpsons_jax() -> dict:
  """Seconds of `main.py`'s second epoch, validation and checkpoint included,
  and the last epoch's validation accuracy."""
  config = _config()
  with tempfile.TemporaryDirectory() as workdir:
    result = subprocess.run(
      [
        sys.executable,
        "main.py",
        "--config=configs/full.py",
        f"--workdir={workdir}",
        f"--config.data.dir={config.data.dir}",
        "--config.data.min_images=1",
        f"--config.data.image_size={config.data.image_size}",
        f"--config.train.num_epochs={config.train.num_epochs}",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
    )
  line = r"^I\d{4} (\S+) .*epoch \d+ validation: loss \S+, accuracy ([\d.]+),"
  found = re.findall(line, result.stderr, re.M)
  stamps = [datetime.strptime(stamp, "%H:%M:%S.%f") for stamp, _ in found]
  return {
    "simpsons_jax_epoch2_seconds": (stamps[1] - stamps[0]).total_seconds(),
    "simpsons_jax_val_accuracy": float(found[-1][1]),
  }


def _demo() -> dict:
  """Seconds of the demo end to end: data generation, compile, 25 epochs."""
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    subprocess.run(
      [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}"],
      cwd=ROOT,
      capture_output=True,
      check=True,
    )
  return {"demo_seconds": time.perf_counter() - start}


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.worker:
    print(json.dumps({"pipeline": _pipeline, "keras": _keras}[FLAGS.worker]()))
    return
  from simpsons_jax import convolutions, cpu_conv

  results = {
    "cpu": cpu_conv.cpu_description(),
    "convolutions": convolutions.implementation(_config())[1],
    "data_dir": FLAGS.data_dir,
    "image_size": FLAGS.image_size,
  }
  for worker in ("pipeline", "keras"):
    out = subprocess.run(
      [
        sys.executable,
        __file__,
        f"--worker={worker}",
        f"--data_dir={FLAGS.data_dir}",
        f"--image_size={FLAGS.image_size}",
        f"--epochs={FLAGS.epochs}",
      ],
      capture_output=True,
      text=True,
      check=True,
    )
    results.update(json.loads(out.stdout.strip().splitlines()[-1]))
  results.update(_simpsons_jax())
  if FLAGS.demo:
    results.update(_demo())
  results["epoch_ratio_simpsons_jax_over_keras"] = (
    results["keras_epoch2_seconds"] / results["simpsons_jax_epoch2_seconds"]
  )
  for key, value in results.items():
    print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
  if FLAGS.json:
    Path(FLAGS.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
