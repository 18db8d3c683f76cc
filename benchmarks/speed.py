"""Images/second of training and inference: simpsons_jax beside Keras and PyTorch.

  pip install -e ".[bench]"
  python benchmarks/speed.py                      # the notebook network, a few minutes
  python benchmarks/speed.py --model=resnet       # strong.py's ResNet beside PyTorch
  python benchmarks/speed.py --frameworks=simpsons_jax --sizes=64 --json=out.json

Each framework's best CPU mode is a framework of its own: `simpsons_jax_bf16`
(`--config.train.dtype=bfloat16`), `keras_bf16` (Keras's `mixed_bfloat16`
policy, the last layer in float32) and `torch_bf16` (`torch.autocast("cpu",
dtype=torch.bfloat16)` around the forward pass and the loss).

Every measurement runs in a fresh worker process (one framework at a time, so
they never compete for the cores), the frameworks take turns round after
round, and each figure is the median over rounds of a timed window of steps
after warm-up. The references are never imported by the package and build the
same network:
- `notebook` (configs/full.py; Keras and PyTorch): 4 conv+pool blocks of
  8/16/32/64, 4 dense layers of 512 with dropout 0.4, 13 outputs, Adam 1e-3,
  softmax cross-entropy; sizes 64 and 128, training batch 64.
- `resnet` (configs/strong.py; PyTorch, channels-last): a 3x3 stem of 32 with
  BatchNorm, ReLU and a 2x2 max pool, one residual block per stage of
  48/96/192, global average pool, 13 outputs; SGD with Nesterov momentum and
  weight decay, label smoothing 0.1 and an EMA of the weights, as strong.py
  trains; sizes 28 (Simpsons-MNIST) and 64, training batch 32. Inference is
  one forward pass (strong.py's flip test-time augmentation off on both).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import results, simpsons_step  # noqa: E402
from simpsons_jax import cpu_conv  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "notebook", ["notebook", "resnet"], "The network.")
flags.DEFINE_list(
  "frameworks",
  None,
  "What to compare (default: simpsons_jax, keras, torch for the notebook's "
  "network; simpsons_jax, torch for the ResNet); each also as <name>_bf16, its "
  "bfloat16 mode.",
)
flags.DEFINE_list("sizes", None, "Image sizes (default: 64,128; the ResNet's 28,64).")
flags.DEFINE_integer(
  "train_batch", None, "Training batch size (default: the config's, 64 or 32)."
)
flags.DEFINE_integer("infer_batch", 256, "Inference batch size.")
flags.DEFINE_integer("rounds", 3, "Rounds; each framework is measured once per round.")
flags.DEFINE_float("window", 10.0, "Seconds of timed steps per measurement.")
flags.DEFINE_string("json", "", "Also write the results to this file.")
flags.DEFINE_enum(
  "cpu_kernels", "onednn", ["onednn", "xla"], "simpsons_jax's convolutions on CPU."
)
flags.DEFINE_string("worker", "", "Internal: measure one framework in this process.")
flags.DEFINE_string("mode", "train", "Internal: train or infer.")
flags.DEFINE_integer("size", 128, "Internal: image size.")
flags.DEFINE_integer("batch", 64, "Internal: batch size.")

# Per model: its config, and the defaults of the flags above.
MODELS = {
  "notebook": dict(
    config="full", frameworks=["simpsons_jax", "keras", "torch"], sizes=["64", "128"]
  ),
  "resnet": dict(
    config="strong", frameworks=["simpsons_jax", "torch"], sizes=["28", "64"]
  ),
}

NUM_CLASSES = 13


def _config():
  """The config of `--model`."""
  return importlib.import_module(
    f"configs.{MODELS[FLAGS.model]['config']}"
  ).get_config()


def _timed(step, window: float, batches_per_call: int = 1) -> float:
  """Images/s of `step()` (which returns after the work is done) over `window` s,
  after `simpsons_step.warm_up`."""
  simpsons_step.warm_up(step)
  calls, start = 0, time.perf_counter()
  while time.perf_counter() - start < window:
    step()
    calls += 1
  return calls * batches_per_call * FLAGS.batch / (time.perf_counter() - start)


def _simpsons_jax(
  mode: str, size: int, batch: int, bfloat16: bool = False
) -> tuple[float, str]:
  config = _config()
  config.data.image_size = size
  config.train.cpu_kernels = FLAGS.cpu_kernels
  config.train.dtype = "bfloat16" if bfloat16 else "float32"
  config.test_time_flip = False  # One forward pass, as the references' inference.
  step, description = simpsons_step.prepared(config, mode, batch, NUM_CLASSES)
  return _timed(step, FLAGS.window), description


def _keras(
  mode: str, size: int, batch: int, bfloat16: bool = False
) -> tuple[float, str]:
  if FLAGS.model != "notebook":
    raise ValueError("the Keras reference builds the notebook's network only")
  import keras
  import numpy as np

  if bfloat16:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  layers = [keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 255)]
  for features in (8, 16, 32, 64):
    layers += [
      keras.layers.Conv2D(features, 3, padding="same", activation="relu"),
      keras.layers.MaxPooling2D(),
    ]
  layers.append(keras.layers.Flatten())
  for _ in range(4):
    layers += [keras.layers.Dropout(0.4), keras.layers.Dense(512, activation="relu")]
  layers += [
    keras.layers.Dropout(0.4),
    keras.layers.Dense(NUM_CLASSES, dtype="float32"),  # float32 logits
  ]
  model = keras.Sequential(layers)
  model.compile(
    optimizer=keras.optimizers.Adam(1e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  import tensorflow as tf

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, batch)
  if mode == "infer":
    return _timed(lambda: model.predict_on_batch(images), FLAGS.window), (
      f"keras {keras.__version__}"
    )

  class Timer(keras.callbacks.Callback):
    """Times the batches of one long `fit` after warm-up, then stops it."""

    def on_train_batch_end(self, index, logs=None):
      if index == 3:
        self.start = time.perf_counter()
      elif index > 3 and time.perf_counter() - self.start > FLAGS.window:
        self.rate = (index - 3) * batch / (time.perf_counter() - self.start)
        self.model.stop_training = True

  # `fit` as users run it: a compiled loop over a dataset.
  timer = Timer()
  data = tf.data.Dataset.from_tensors((images, labels)).repeat()
  model.fit(data, epochs=1, steps_per_epoch=10**6, verbose=0, callbacks=[timer])
  return timer.rate, f"keras {keras.__version__}"


def _torch_resnet(size: int):
  """strong.py's ResNet, its optimizer and its EMA, in PyTorch."""
  import torch
  from torch import nn

  def norm(features: int, zero: bool = False) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(features, momentum=0.1)  # Flax's momentum 0.9.
    if zero:
      nn.init.zeros_(layer.weight)
    return layer

  class Block(nn.Module):
    def __init__(self, channels: int, features: int, stride: int):
      super().__init__()
      self.body = nn.Sequential(
        nn.Conv2d(channels, features, 3, stride, 1, bias=False),
        norm(features),
        nn.ReLU(),
        nn.Conv2d(features, features, 3, 1, 1, bias=False),
        norm(features, zero=True),
      )
      self.shortcut = nn.Identity()
      if stride != 1 or channels != features:
        self.shortcut = nn.Sequential(
          nn.Conv2d(channels, features, 1, stride, bias=False), norm(features)
        )

    def forward(self, x):
      return torch.relu(self.body(x) + self.shortcut(x))

  layers: list[nn.Module] = [
    nn.Conv2d(3, 32, 3, 1, 1, bias=False),
    norm(32),
    nn.ReLU(),
    nn.MaxPool2d(2),
  ]
  channels = 32
  for i, features in enumerate((48, 96, 192)):
    layers.append(Block(channels, features, 2 if i else 1))
    channels = features
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES)]
  model = nn.Sequential(*layers).to(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(
    model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
  )
  ema = [p.detach().clone() for p in model.parameters()]

  def after_step():
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(model.parameters()), 1 - 0.995)

  return model, optimizer, 0.1, after_step, lambda x: x.float() / 127.5 - 1


def _torch_notebook(size: int):
  """The notebook's network and Adam in PyTorch."""
  import torch
  from torch import nn

  layers: list[nn.Module] = []
  channels = 3
  for features in (8, 16, 32, 64):
    layers += [nn.Conv2d(channels, features, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    channels = features
  layers.append(nn.Flatten())
  width = channels * (size // 16) ** 2
  for _ in range(4):
    layers += [nn.Dropout(0.4), nn.Linear(width, 512), nn.ReLU()]
    width = 512
  layers += [nn.Dropout(0.4), nn.Linear(512, NUM_CLASSES)]
  model = nn.Sequential(*layers).to(memory_format=torch.channels_last)
  optimizer = torch.optim.Adam(model.parameters(), 1e-3)
  return model, optimizer, 0.0, lambda: None, lambda x: x.float() / 255


def _torch(
  mode: str, size: int, batch: int, bfloat16: bool = False
) -> tuple[float, str]:
  import torch
  from torch import nn

  def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16)

  build = _torch_resnet if FLAGS.model == "resnet" else _torch_notebook
  model, optimizer, label_smoothing, after_step, scale = build(size)
  images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
  labels = torch.randint(0, NUM_CLASSES, (batch,))

  def step():
    x = scale(images).contiguous(memory_format=torch.channels_last)
    if mode == "train":
      model.train()
      optimizer.zero_grad()
      with autocast():
        loss = nn.functional.cross_entropy(
          model(x), labels, label_smoothing=label_smoothing
        )
      loss.backward()
      optimizer.step()
      after_step()
    else:
      model.eval()
      with torch.no_grad(), autocast():
        model(x)

  return _timed(step, FLAGS.window), f"torch {torch.__version__}"


WORKERS = {"simpsons_jax": _simpsons_jax, "keras": _keras, "torch": _torch}
WORKERS.update(
  {
    f"{name}_bf16": functools.partial(worker, bfloat16=True)
    for name, worker in list(WORKERS.items())
  }
)


def _measure(framework: str, mode: str, size: int, batch: int) -> tuple[float, str]:
  """Runs one worker process and returns its images/s and version."""
  result = subprocess.run(
    [sys.executable, __file__, f"--worker={framework}", f"--mode={mode}"]
    + [f"--model={FLAGS.model}"]
    + [f"--size={size}", f"--batch={batch}", f"--window={FLAGS.window}"]
    + [f"--cpu_kernels={FLAGS.cpu_kernels}"],
    cwd=Path(__file__).resolve().parents[1],
    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
    capture_output=True,
    text=True,
    check=False,
  )
  if result.returncode:
    raise RuntimeError(f"{framework} {mode} {size}px failed:\n{result.stderr[-2000:]}")
  line = json.loads(result.stdout.strip().splitlines()[-1])
  return line["images_per_second"], line["version"]


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.worker:
    rate, version = WORKERS[FLAGS.worker](FLAGS.mode, FLAGS.size, FLAGS.batch)
    print(json.dumps({"images_per_second": rate, "version": version}))
    return
  defaults = MODELS[FLAGS.model]
  FLAGS.frameworks = FLAGS.frameworks or defaults["frameworks"]
  train_batch = FLAGS.train_batch or _config().train.batch_size
  cases = [
    (mode, int(size), train_batch if mode == "train" else FLAGS.infer_batch)
    for size in FLAGS.sizes or defaults["sizes"]
    for mode in ("train", "infer")
  ]
  rates: dict[tuple, list[float]] = {}
  versions: dict[str, str] = {}
  for round_index in range(FLAGS.rounds):
    for case in cases:
      for framework in FLAGS.frameworks:
        rate, versions[framework] = _measure(framework, *case)
        rates.setdefault((framework, *case), []).append(rate)
        print(
          f"round {round_index + 1}: {framework} {case}: {rate:.0f} images/s",
          file=sys.stderr,
        )
  machine = f"{cpu_conv.cpu_description()}, {os.cpu_count()} cores"
  rows = []
  print(
    f"\n{FLAGS.model}: images/s on {machine} (median of {FLAGS.rounds} rounds); "
    + ", ".join(versions.values())
  )
  header = f"{'mode':6} {'size':>4} {'batch':>5} " + " ".join(
    f"{f:>13}" for f in FLAGS.frameworks
  )
  ours = [f for f in FLAGS.frameworks if f.startswith("simpsons_jax")]
  peers = [f for f in FLAGS.frameworks if f not in ours]
  compare = bool(ours and peers)
  print(header + ("   best jax / best peer" if compare else ""))
  for case in cases:
    medians = {f: statistics.median(rates[(f, *case)]) for f in FLAGS.frameworks}
    best = {
      group: max(group_members, key=medians.get)
      for group, group_members in (("ours", ours), ("peers", peers))
      if group_members
    }
    ratio = (
      f"{medians[best['ours']] / medians[best['peers']]:.2f}x "
      f"({best['ours']} / {best['peers']})"
      if compare
      else ""
    )
    print(
      f"{case[0]:6} {case[1]:>4} {case[2]:>5} "
      + " ".join(f"{medians[f]:>13.0f}" for f in FLAGS.frameworks)
      + f"   {ratio}"
    )
    rows.append(
      {
        "mode": case[0],
        "size": case[1],
        "batch": case[2],
        "images_per_second": medians,
        "all_rounds": {f: rates[(f, *case)] for f in FLAGS.frameworks},
      }
    )
  if FLAGS.json:
    results.write(
      FLAGS.json,
      "speed",
      {
        "model": FLAGS.model,
        "rounds": FLAGS.rounds,
        "window_seconds": FLAGS.window,
        "framework_versions": versions,
        "results": rows,
      },
    )


if __name__ == "__main__":
  app.run(main)
