"""Checks of a config's values before heavy work.

Unknown keys and wrong types are rejected by `lock_config` when the flags are
parsed; here go values that are impossible, and sizes that cannot fit in
memory (`footprint`). Whether a workdir's run can be continued is
`run_folder.prepare`'s to say.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from jax.sharding import Mesh

from simpsons_jax import (
  checkpointing,
  config_keys,
  data,
  errors,
  footprint,
  mixing,
  models,
  sharding,
)

CHOICES = {
  "train.dtype": ("float32", "bfloat16"),
  "train.cpu_kernels": ("onednn", "xla"),
  "optim.name": ("adam", "adamw", "sgd"),
  "optim.schedule": ("constant", "cosine"),
  "train.class_weights": ("none", "balanced"),
  "train.mix": mixing.KINDS,
  "ckpt.metric": checkpointing.RANKING_METRICS,
}
# Options that must lie in [low, high).
RANGES = {
  "train.label_smoothing": (0, 1),
  "data.negatives_val_share": (0, 1),
  "data.unknown_share": (0, 1),
  "optim.ema_decay": (0, 1),
  "augment.brightness": (0, 1),
  "augment.contrast": (0, 1),
  "augment.saturation": (0, 1),
  "augment.shift": (0, 0.5),
  "augment.rotation_degrees": (0, 180),
}
NOT_NEGATIVE = ("optim.warmup_epochs", "optim.weight_decay", "train.negatives_weight")
AT_LEAST_ONE = (
  "data.min_images",
  "train.batch_size",
  "train.num_epochs",
  "train.log_every_steps",
  "ckpt.keep",
)
POSITIVE = ("optim.learning_rate", "train.mix_alpha", "data.max_image_pixels")


def check(
  config: ml_collections.ConfigDict, mesh: Mesh, more: Sequence[str] = ()
) -> None:
  """Raises ValueError naming the option and the fix for impossible values
  (and the `more` problems found by their owners, e.g. the evaluators')."""
  problems = list(more)
  if config.model.name not in models.MODELS:
    problems.append(
      f"model.name={config.model.name!r} must be one of {', '.join(models.MODELS)}"
    )
  else:
    smallest = models.min_image_size(config)
    if config.data.image_size < smallest:
      problems.append(
        f"data.image_size={config.data.image_size} is too small for "
        f"model.name={config.model.name} with these layers: use at least {smallest}"
      )
    dropout = config.model[config.model.name].get("dropout_rate", 0.0)
    if not 0 <= dropout < 1:
      problems.append(
        f"model.{config.model.name}.dropout_rate={dropout} must lie in [0, 1)"
      )
  if not 0 < config.data.val_fraction < 1:
    problems.append(f"data.val_fraction={config.data.val_fraction} must lie in (0, 1)")
  if not 0 < config.data.train_fraction <= 1:
    problems.append(
      f"data.train_fraction={config.data.train_fraction} must lie in (0, 1]"
    )
  if not 0 < config.augment.crop_min_area <= 1:
    problems.append(
      f"augment.crop_min_area={config.augment.crop_min_area} must lie in (0, 1]"
    )
  for key, (low, high) in RANGES.items():
    if not low <= config_keys.lookup(config, key) < high:
      problems.append(
        f"{key}={config_keys.lookup(config, key)} must lie in [{low}, {high})"
      )
  for keys, test, says in (
    (NOT_NEGATIVE, lambda v: v >= 0, "must not be negative"),
    (AT_LEAST_ONE, lambda v: v >= 1, "must be at least 1"),
    (POSITIVE, lambda v: v > 0, "must be positive"),
  ):
    problems += [
      f"{k}={config_keys.lookup(config, k)} {says}"
      for k in keys
      if not test(config_keys.lookup(config, k))
    ]
  for key, choices in CHOICES.items():
    if config_keys.lookup(config, key) not in choices:
      problems.append(
        f"{key}={config_keys.lookup(config, key)!r} must be one of {', '.join(choices)}"
      )
  if data.source_name(config.data.source) not in data.SOURCES:
    problems.append(
      f"data.source={config.data.source!r} must be one of {', '.join(data.SOURCES)} "
      "(tfds as tfds:NAME[:VERSION])"
    )
  if problems:
    raise errors.UserError("Invalid config: " + "; ".join(problems) + ".")
  sharding.check_batch_size(config.train.batch_size, mesh)
  footprint.check(config, mesh)
