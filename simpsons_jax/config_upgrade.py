"""Saved configs of older runs, read as today's: the one place that knows
what the config used to look like.

Until December 2026 the config was flat (`config.data_dir`,
`config.learning_rate`, `config.conv_features`, ...) and keys were added over
time, so a workdir's `config.json` may lack some. `upgrade` turns any saved
config into today's nested one (`config.data`, `config.model`, `config.optim`,
`config.train`, `config.finetune`, `config.evals`, `config.ckpt`), filling what
an old run never had with the value it ran with; everything else reads keys
directly. `new_key` names where a flat command-line key went.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections

from simpsons_jax import errors

# Flat key -> (nested key, the value runs saved before the key existed ran
# with). 'model.*' keys land in the group of the run's model.
RENAMED: dict[str, tuple[str, Any]] = {
  "dataset": ("data.source", "folder"),
  "data_dir": ("data.dir", ""),
  "tfds_data_dir": ("data.tfds_dir", ""),
  "tfds_split": ("data.tfds_split", "train"),
  "min_images": ("data.min_images", 800),
  "image_size": ("data.image_size", 128),
  "val_fraction": ("data.val_fraction", 0.05),
  "train_fraction": ("data.train_fraction", 1.0),
  "cache_dir": ("data.cache_dir", ""),
  "exclude_copies_of": ("data.exclude_copies_of", ""),
  "synthetic_images_per_character": ("data.synthetic_per_character", 250),
  "max_image_pixels": ("data.max_image_pixels", 100_000_000),
  "model": ("model.name", "simpsons_cnn"),
  "conv_features": ("model.simpsons_cnn.conv_features", (8, 16, 32, 64)),
  "dense_features": ("model.simpsons_cnn.dense_features", (512, 512, 512, 512)),
  "stem_features": ("model.resnet.stem_features", 32),
  "stem_pool": ("model.resnet.stem_pool", False),
  "stage_features": ("model.resnet.stage_features", (32, 64, 128)),
  "blocks_per_stage": ("model.resnet.blocks_per_stage", 1),
  "dropout_rate": ("model.*.dropout_rate", 0.4),
  "dtype": ("train.dtype", "float32"),
  "cpu_kernels": ("train.cpu_kernels", "onednn"),
  "require_accelerator": ("train.require_accelerator", False),
  "batch_size": ("train.batch_size", 64),
  "num_epochs": ("train.num_epochs", 70),
  "label_smoothing": ("train.label_smoothing", 0.0),
  "mix": ("train.mix", "none"),
  "mix_alpha": ("train.mix_alpha", 1.0),
  "class_weights": ("train.class_weights", "none"),
  "log_every_steps": ("train.log_every_steps", 50),
  "eval_every_steps": ("train.eval_every_steps", 0),
  "profile_steps": ("train.profile_steps", 0),
  "optimizer": ("optim.name", "adam"),
  "learning_rate": ("optim.learning_rate", 1e-3),
  "schedule": ("optim.schedule", "constant"),
  "warmup_epochs": ("optim.warmup_epochs", 0.0),
  "weight_decay": ("optim.weight_decay", 0.0),
  "ema_decay": ("optim.ema_decay", 0.0),
  "init_from": ("finetune.init_from", ""),
  "freeze": ("finetune.freeze", ()),
  "unfreeze_after_epochs": ("finetune.unfreeze_after_epochs", 0.0),
  "lr_multipliers": ("finetune.lr_multipliers", ()),
  "eval_flip": ("test_time_flip", False),
  "checkpoint_every_steps": ("ckpt.every_steps", 0),
  "checkpoints_to_keep": ("ckpt.keep", 3),
  "checkpoint_metric": ("ckpt.metric", "accuracy"),
  "seed": ("seed", 0),
  "restart": ("restart", False),
}
# Keys added since the config was nested, and what older runs ran with.
ADDED: dict[str, Any] = {
  "data.hold_out": (),
  "data.negatives": "",
  "data.negatives_val_share": 0.0,
  # Read only when a run chooses its threshold, after training: a run that
  # never had it chose before it existed, and one finished now uses today's.
  "data.unknown_share": 0.2,
  "train.negatives_weight": 2.0,
}
# The augmentation group kept its keys; runs saved before one existed ran with these.
AUGMENT_DEFAULTS = {
  "flip": False,
  "crop_min_area": 1.0,
  "shift": 0.0,
  "rotation_degrees": 0.0,
  "brightness": 0.0,
  "contrast": 0.0,
  "saturation": 0.0,
}


def new_key(flat_key: str, model: str = "simpsons_cnn") -> str | None:
  """Where a flat config key (e.g. 'data_dir') lives now ('data.dir'), or None."""
  if flat_key not in RENAMED:
    return None
  return RENAMED[flat_key][0].replace("*", model)


def upgrade(
  saved: Mapping[str, Any],
  model_settings: Mapping[str, Mapping[str, Any]],
  where: str = "The saved config",
) -> ml_collections.ConfigDict:
  """Today's config for a saved one, flat (before December 2026) or nested.

  Keys an old run never had get the value it ran with; evaluators without a
  `type` are folders. Every key is then checked against today's (`schema`,
  with `model_settings`: each registered model's settings and defaults,
  `models.registered_settings()`): a key this version lacks (a newer version
  wrote it), a value of the wrong type, a missing key or a model this version
  lacks is a UserError naming `where` (the file) and the key.
  """
  saved = copy.deepcopy(dict(saved))
  if "data" in saved and isinstance(saved["data"], Mapping):
    nested = saved
  else:
    nested = _nest(saved, where)
  for key, default in ADDED.items():  # Keys newer than the nesting.
    group, _, last = key.rpartition(".")
    if isinstance(nested.setdefault(group, {}), dict):
      nested[group].setdefault(last, default)
  if isinstance(nested.setdefault("augment", {}), dict):
    for key, default in AUGMENT_DEFAULTS.items():
      nested["augment"].setdefault(key, default)
  evals = {}
  for name, spec in (nested.get("evals") or {}).items():
    if not isinstance(spec, dict):
      raise _damaged(where, f"evals.{name} is not a group of settings")
    spec = dict(spec)
    if "eval_dir" in spec:  # A folder evaluator of the flat config.
      spec["dir"] = spec.pop("eval_dir")
    spec.setdefault("type", "folder")
    spec.setdefault("every_epochs", 1)
    evals[name] = spec
  nested["evals"] = evals
  _check(nested, model_settings, where)
  return ml_collections.ConfigDict(nested)


def schema(model_settings: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """Every key of today's config ('group.key') with its default, whose type
  a saved value must have; a model's settings for every model of
  `model_settings` ('model.<name>.<setting>'). `evals` entries are free-form."""
  known = {new: value for new, value in RENAMED.values() if "*" not in new}
  known.update(ADDED)
  known.update({f"augment.{key}": value for key, value in AUGMENT_DEFAULTS.items()})
  for name, settings in model_settings.items():
    for key, value in settings.items():
      known[f"model.{name}.{key}"] = value
  return known


def _check(
  nested: Mapping[str, Any], model_settings: Mapping[str, Mapping], where: str
) -> None:
  """UserError for keys this version lacks, wrong types and missing keys."""
  known = schema(model_settings)
  model = (
    nested.get("model", {}).get("name")
    if isinstance(nested.get("model"), dict)
    else None
  )
  if isinstance(model, str) and model not in model_settings:
    raise errors.UserError(
      f"{where} names the model {model!r}, which this version does not have "
      f"({', '.join(model_settings)}): it was trained by a newer simpsons_jax or "
      "with a model your own code registers; use that version or code for this run"
    )
  flat: dict[str, Any] = {}
  _flatten(nested, "", flat, known)
  unknown = sorted(key for key in flat if key not in known)
  if unknown:
    raise errors.UserError(
      f"{where} has keys this version does not know ({', '.join(unknown)}): it was "
      "written by a newer simpsons_jax; use that version for this workdir."
    )
  for key, value in flat.items():
    if not _same_kind(value, known[key]):
      raise _damaged(where, f"{key} is {value!r}, not {_kind(known[key])}")
  required = [
    key
    for key in known
    if not key.startswith("model.") or key.startswith(f"model.{model}.")
  ]
  missing = [key for key in required if key not in flat]
  if missing:
    raise _damaged(where, f"it lacks {', '.join(missing[:5])}")


def _flatten(
  tree: Mapping[str, Any], prefix: str, flat: dict[str, Any], known: Mapping
) -> None:
  """Dotted keys of the groups `known` has; other models' groups are left out
  (a run uses only its own model's settings)."""
  for key, value in tree.items():
    dotted = prefix + key
    if dotted == "evals":
      continue
    is_group = any(k.startswith(dotted + ".") for k in known)
    if is_group and isinstance(value, dict):
      _flatten(value, dotted + ".", flat, known)
    elif not (prefix == "model." and isinstance(value, dict)):
      flat[dotted] = value


def _same_kind(value: Any, default: Any) -> bool:
  """Whether a saved value has the type of the key's default."""
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, int | float) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, list | tuple):
    return isinstance(value, list | tuple)
  return True


def _kind(default: Any) -> str:
  for kind, words in (
    (bool, "true or false"),
    (int, "an integer"),
    (float, "a number"),
  ):
    if isinstance(default, kind):
      return words
  return "a string" if isinstance(default, str) else "a list"


def _damaged(where: str, why: str) -> errors.UserError:
  return errors.UserError(
    f"{where} is damaged ({why}): restore it from a copy of the run, or train "
    "afresh in a new --workdir."
  )


def _nest(flat: dict[str, Any], where: str) -> dict[str, Any]:
  model = flat.get("model", RENAMED["model"][1])
  nested: dict[str, Any] = {
    "augment": flat.pop("augment", {}),
    "evals": flat.pop("evals", {}),
  }
  unknown = sorted(set(flat) - set(RENAMED))
  if unknown:
    raise errors.UserError(
      f"{where} has keys this version does not know ({', '.join(unknown)}): it was "
      "written by a newer simpsons_jax; use that version for this workdir."
    )
  for old, (new, default) in RENAMED.items():
    if new.count(".") == 2 and new.split(".")[1] not in ("*", model):
      continue  # Another model's settings: the run never used them.
    _set(nested, new.replace("*", model), flat.get(old, default))
  return nested


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
  *groups, last = dotted.split(".")
  for group in groups:
    tree = tree.setdefault(group, {})
  tree[last] = value
