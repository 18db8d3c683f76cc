"""Checks of a config's values before heavy work.

Unknown keys and wrong types are rejected by `lock_config` when the flags are
parsed; here go values that are impossible. Whether a workdir's run can be
continued is `workdir.prepare`'s to say.
"""

from __future__ import annotations

import functools

import ml_collections
from jax.sharding import Mesh

from simpsons_jax import checkpointing, data, mixing, models, sharding

CHOICES = {
  "dtype": ("float32", "bfloat16"),
  "cpu_kernels": ("onednn", "xla"),
  "optimizer": ("adam", "adamw", "sgd"),
  "schedule": ("constant", "cosine"),
  "class_weights": ("none", "balanced"),
  "mix": mixing.KINDS,
  "checkpoint_metric": checkpointing.RANKING_METRICS,
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


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Raises ValueError naming the option and the fix for impossible values."""
  problems = []
  if config.model in models.MODELS:
    smallest = models.MODELS[config.model].min_image_size(config)
    if config.image_size < smallest:
      problems.append(
        f"image_size={config.image_size} is too small for model={config.model} "
        f"with these layers: use at least {smallest}"
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
  for key in ("learning_rate", "mix_alpha", "max_image_pixels"):
    if config[key] <= 0:
      problems.append(f"{key}={config[key]} must be positive")
  if config.checkpoints_to_keep < 1:
    problems.append(f"checkpoints_to_keep={config.checkpoints_to_keep} must be >= 1")
  for key, choices in CHOICES.items():
    if config[key] not in choices:
      problems.append(f"{key}={config[key]!r} must be one of {', '.join(choices)}")
  if config.model not in models.MODELS:
    problems.append(f"model={config.model!r} must be one of {', '.join(models.MODELS)}")
  if data.source_name(config.dataset) not in data.SOURCES:
    problems.append(
      f"dataset={config.dataset!r} must be one of {', '.join(data.SOURCES)} "
      "(tfds as tfds:NAME[:VERSION])"
    )
  if problems:
    raise ValueError("Invalid config: " + "; ".join(problems) + ".")
  sharding.check_batch_size(config.batch_size, mesh)
