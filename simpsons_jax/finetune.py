"""Starting a run from another run's weights, and freezing or slowing layers.

`config.init_from = "WORKDIR[:best|latest|STEP]"` loads, at step 0 only, the
inference variables of another run's checkpoint (its EMA if it kept one:
the weights it was evaluated with) into the new model: every layer whose
path and shape match is loaded; the classification head is loaded whole when
the characters are the same, otherwise mapped column by column for the
characters the two runs share (by name) and freshly initialised for the
others. Any other difference is an error naming the layer.

`config.freeze` (regular expressions on parameter paths such as
`conv0/kernel` or `ResidualBlock_2/Conv_1/kernel`, matched in full) keeps
those parameters, and the BatchNorm statistics of the layers they name,
unchanged until `config.unfreeze_after_epochs` (0: for good);
`config.lr_multipliers` ("PATTERN=FACTOR") scales their updates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from simpsons_jax import checkpointing, predict

HEAD = "logits"  # The name of every model's classification layer.


def parse_init_from(value: str) -> tuple[str, str]:
  """'WORKDIR[:best|latest|STEP]' -> (workdir, checkpoint); 'best' by default."""
  workdir, _, which = value.rpartition(":")
  if workdir and (which in ("best", "latest") or which.isdigit()):
    return workdir, which
  return value, "best"


def merge(
  fresh: Mapping[str, Any],
  loaded: Mapping[str, Any],
  names: Sequence[str],
  loaded_names: Sequence[str],
) -> tuple[dict[str, Any], list[str]]:
  """`fresh` variables with `loaded`'s values where they fit; and what was done.

  Both are {"params": ..., "batch_stats": ...} trees of the same model family.
  """
  flat_fresh = traverse_util.flatten_dict(dict(fresh), sep="/")
  flat_loaded = traverse_util.flatten_dict(dict(loaded), sep="/")
  extra = sorted(set(flat_loaded) - set(flat_fresh))
  if extra:
    raise ValueError(
      f"init_from: the source run has layers this model lacks ({', '.join(extra[:5])}"
      f"{', ...' if len(extra) > 5 else ''}): use a model of the same family and "
      "layers."
    )
  merged, loaded_count, report = {}, 0, []
  for path, value in flat_fresh.items():
    if path not in flat_loaded:
      raise ValueError(
        f"init_from: the source run has no layer {path}: use a model of the same "
        "family and layers."
      )
    source = flat_loaded[path]
    in_head = path.startswith(f"params/{HEAD}/")
    if in_head and tuple(names) != tuple(loaded_names):
      merged[path], line = _map_head(value, source, names, loaded_names, path)
      report.append(line)
      continue
    if source.shape != value.shape:
      raise ValueError(
        f"init_from: layer {path} has shape {tuple(source.shape)} in the source "
        f"run and {tuple(value.shape)} here: use the same layer sizes."
      )
    merged[path] = source
    loaded_count += 1
  report.insert(0, f"loaded {loaded_count} of {len(flat_fresh)} arrays")
  tree = traverse_util.unflatten_dict(merged, sep="/")
  return {key: tree.get(key, {}) for key in fresh}, report  # Empty ones too.


def _map_head(fresh, source, names, loaded_names, path) -> tuple[Any, str]:
  """The head's last axis (one entry per character) mapped by name."""
  fresh, source = np.asarray(fresh), np.asarray(source)
  if fresh.shape[:-1] != source.shape[:-1]:
    raise ValueError(
      f"init_from: layer {path} has shape {source.shape} in the source run and "
      f"{fresh.shape} here: use the same layer sizes."
    )
  out = fresh.copy()
  shared = [
    (i, loaded_names.index(n)) for i, n in enumerate(names) if n in loaded_names
  ]
  for i, j in shared:
    out[..., i] = source[..., j]
  new = [n for n in names if n not in loaded_names]
  return out, (
    f"{path}: {len(shared)} characters mapped by name, {len(new)} initialised "
    f"afresh{' (' + ', '.join(new) + ')' if new else ''}"
  )


def initialize(
  fresh: Mapping[str, Any], config: ml_collections.ConfigDict, cmap
) -> dict[str, Any]:
  """The variables a run starts from: `fresh` merged with `config.init_from`'s."""
  workdir, which = parse_init_from(config.init_from)
  try:
    source_config = checkpointing.load_config(workdir)
    if source_config.model != config.model:
      raise ValueError(
        f"{workdir} trained model={source_config.model}, this run "
        f"model={config.model}: start from a run of the same model."
      )
    source = predict.load(workdir, which)
  except (FileNotFoundError, ValueError) as e:
    # The loaders speak of --workdir and --checkpoint: here the user wrote
    # --config.init_from=WORKDIR[:CHECKPOINT].
    said = str(e).replace("--workdir", "--config.init_from")
    said = said.replace("--checkpoint=", "the checkpoint ")
    raise type(e)(f"--config.init_from={config.init_from}: {said}") from None
  merged, report = merge(fresh, source.variables, cmap.names, source.cmap.names)
  logging.info(
    "Started from step %d of %s: %s.", source.step, workdir, "; ".join(report)
  )
  return merged


def _patterns(patterns: Sequence[str]) -> list[re.Pattern]:
  return [re.compile(p) for p in patterns]


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in keys)


def frozen_mask(tree: Any, patterns: Sequence[str]) -> Any:
  """True for the leaves whose path (`layer/.../name`) a pattern matches in full.

  For BatchNorm statistics, a layer counts as frozen when its parameters are:
  `X/scale` frozen freezes `X/mean` and `X/var` too.
  """
  compiled = _patterns(patterns)

  def frozen(keys, _):
    path = _path(keys)
    layer = path.rsplit("/", 1)[0]
    candidates = (path, f"{layer}/scale", f"{layer}/bias", f"{layer}/kernel")
    return any(p.fullmatch(c) for p in compiled for c in candidates)

  return jax.tree_util.tree_map_with_path(frozen, tree)


def _factor(path: str, multipliers: Sequence[tuple[re.Pattern, float]]) -> float:
  for pattern, factor in multipliers:
    if pattern.fullmatch(path):
      return factor
  return 1.0


def parse_multipliers(values: Sequence[str]) -> list[tuple[re.Pattern, float]]:
  """("PATTERN=FACTOR", ...) -> [(compiled, factor)]; the first match wins."""
  parsed = []
  for value in values:
    pattern, sep, factor = value.rpartition("=")
    try:
      parsed.append((re.compile(pattern), float(factor)))
    except (re.error, ValueError):
      sep = ""
    if not sep:
      raise ValueError(
        f"lr_multipliers entry {value!r} is not PATTERN=FACTOR, e.g. 'conv.*=0.1'."
      )
  return parsed


def scale_updates(
  freeze: Sequence[str], multipliers: Sequence[str], unfreeze_step: int
) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its learning-rate multiplier, and
  by 0 while it is frozen (before `unfreeze_step`; for good when 0)."""
  compiled = parse_multipliers(multipliers)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    frozen = frozen_mask(updates, freeze)
    still = state.count < unfreeze_step if unfreeze_step > 0 else True

    def scale(keys, update, is_frozen):
      factor = _factor(_path(keys), compiled)
      if is_frozen:
        factor = jnp.where(still, 0.0, factor)
      return update * jnp.asarray(factor, update.dtype)

    scaled = jax.tree_util.tree_map_with_path(scale, updates, frozen)
    return scaled, optax.ScaleByScheduleState(
      count=optax.safe_int32_increment(state.count)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def keep_frozen_stats(
  old: Any, new: Any, freeze: Sequence[str], step: jax.Array, unfreeze_step: int
) -> Any:
  """BatchNorm statistics: the old values for frozen layers, else the new."""
  if not freeze:
    return new
  still = step < unfreeze_step if unfreeze_step > 0 else True
  mask = frozen_mask(new, freeze)
  return jax.tree.map(
    lambda o, n, m: jnp.where(still, o, n) if m else n, old, new, mask
  )


def describe(params: Any, config: ml_collections.ConfigDict) -> str:
  """How many parameter arrays are frozen and scaled, for the log."""
  freeze = config.get("freeze", ())
  multipliers = parse_multipliers(config.get("lr_multipliers", ()))
  frozen = jax.tree.leaves(frozen_mask(params, freeze))
  scaled = [
    _factor(_path(keys), multipliers) != 1.0
    for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  return (
    f"{sum(frozen)} of {len(frozen)} parameter arrays frozen, {sum(scaled)} with a "
    "learning-rate multiplier"
  )
