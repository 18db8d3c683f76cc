"""Checks of a config, and of a workdir it is about to use, before heavy work.

Unknown keys and wrong types are rejected by `lock_config` when the flags are
parsed; here go values that are impossible, and workdirs whose saved run a
config cannot continue.
"""

from __future__ import annotations

import datetime
import functools
import shutil
from pathlib import Path

import ml_collections
from absl import logging
from jax.sharding import Mesh

from simpsons_jax import checkpointing, mixing, sharding

NUM_POOLINGS = 4
# What a resumed run must share with the run it continues: they fix the
# labels, the split, the data order or the shapes of the saved arrays.
RESUME_FIXED = (
  "dataset",
  "min_images",
  "image_size",
  "val_fraction",
  "train_fraction",
  "seed",
  "batch_size",
  "synthetic_images_per_character",
  "model",
  "conv_features",
  "dense_features",
  "stem_features",
  "stem_pool",
  "stage_features",
  "blocks_per_stage",
  "optimizer",
  "schedule",
  "ema_decay",
)
CHOICES = {
  "dataset": ("folder", "synthetic"),
  "dtype": ("float32", "bfloat16"),
  "cpu_kernels": ("onednn", "xla"),
  "model": ("simpsons_cnn", "resnet"),
  "optimizer": ("adam", "adamw", "sgd"),
  "schedule": ("constant", "cosine"),
  "class_weights": ("none", "balanced"),
  "mix": mixing.KINDS,
}
# Options that must lie in [low, high).
RANGES = {
  "dropout_rate": (0, 1),
  "label_smoothing": (0, 1),
  "ema_decay": (0, 1),
  "augment.brightness": (0, 1),
  "augment.contrast": (0, 1),
  "augment.saturation": (0, 1),
  "augment.shift": (0, 0.5),
  "augment.rotation_degrees": (0, 180),
}
# What `restart` moves aside; synthetic data and caches are kept.
RUN_FILES = (
  "checkpoints",
  "tensorboard",
  "eval",
  "characters.json",
  "config.json",
  "skipped_files.json",
)


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Raises ValueError naming the option and the fix for impossible values."""
  problems = []
  smallest = 2**NUM_POOLINGS
  if config.image_size < smallest:
    problems.append(
      f"image_size={config.image_size} is too small for {NUM_POOLINGS} 2x2 "
      f"poolings: use at least {smallest}"
    )
  if not 0 < config.val_fraction < 1:
    problems.append(f"val_fraction={config.val_fraction} must lie in (0, 1)")
  if not 0 < config.train_fraction <= 1:
    problems.append(f"train_fraction={config.train_fraction} must lie in (0, 1]")
  for key, (low, high) in RANGES.items():
    value = functools.reduce(getattr, key.split("."), config)
    if not low <= value < high:
      problems.append(f"{key}={value} must lie in [{low}, {high})")
  if not 0 < config.augment.crop_min_area <= 1:
    problems.append(
      f"augment.crop_min_area={config.augment.crop_min_area} must lie in (0, 1]"
    )
  for key in ("warmup_epochs", "weight_decay"):
    if config[key] < 0:
      problems.append(f"{key}={config[key]} must not be negative")
  for key in (
    "min_images",
    "batch_size",
    "num_epochs",
    "log_every_steps",
    "stem_features",
    "blocks_per_stage",
  ):
    if config[key] < 1:
      problems.append(f"{key}={config[key]} must be at least 1")
  for key in ("learning_rate", "mix_alpha"):
    if config[key] <= 0:
      problems.append(f"{key}={config[key]} must be positive")
  if config.checkpoints_to_keep < 1:
    problems.append(f"checkpoints_to_keep={config.checkpoints_to_keep} must be >= 1")
  for key, choices in CHOICES.items():
    if config[key] not in choices:
      problems.append(f"{key}={config[key]!r} must be one of {', '.join(choices)}")
  if problems:
    raise ValueError("Invalid config: " + "; ".join(problems) + ".")
  sharding.check_batch_size(config.batch_size, mesh)


def _normalise(value):
  return list(value) if isinstance(value, list | tuple) else value


def prepare_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Makes sure `workdir` can take this run.

  A workdir holding a run with other fixed settings is an error, unless
  `config.restart`, which moves that run to `<workdir>/archive/<time>/`.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  saved_config = workdir / checkpointing.CONFIG_FILENAME
  existing = [workdir / name for name in RUN_FILES if (workdir / name).exists()]
  if config.restart and existing:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    archive = workdir / "archive" / stamp
    archive.mkdir(parents=True)
    for path in existing:
      shutil.move(path, archive / path.name)
    logging.warning("restart=True: the previous run was moved to %s.", archive)
    return
  if not saved_config.exists():
    return
  saved = checkpointing.load_config(workdir)
  changed = [
    f"{key}: {_normalise(saved.get(key))!r} -> {_normalise(config[key])!r}"
    for key in RESUME_FIXED
    if _normalise(saved.get(key)) != _normalise(config[key])
  ]
  if changed:
    raise ValueError(
      f"{workdir} holds a run this config cannot continue ({'; '.join(changed)}). "
      "Use another --workdir, the old settings, or --config.restart=True to "
      "move the old run to <workdir>/archive/ and start afresh."
    )
