"""Freezing and slowing layers while fine-tuning.

`config.finetune.freeze` (regular expressions on parameter paths such as
`conv0/kernel` or `ResidualBlock_2/Conv_1/kernel`, matched in full) keeps
those parameters, and the BatchNorm statistics of the layers they name,
unchanged until `config.finetune.unfreeze_after_epochs` (0: for good);
`config.finetune.lr_multipliers` ("PATTERN=FACTOR") scales their updates.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from simpsons_jax import errors


def unfreeze_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The step at which frozen layers start to learn (0: never)."""
  return round(config.finetune.unfreeze_after_epochs * steps_per_epoch)


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
      raise errors.UserError(
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
  freeze = config.finetune.freeze
  multipliers = parse_multipliers(config.finetune.lr_multipliers)
  frozen = jax.tree.leaves(frozen_mask(params, freeze))
  scaled = [
    _factor(_path(keys), multipliers) != 1.0
    for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  return (
    f"{sum(frozen)} of {len(frozen)} parameter arrays frozen, {sum(scaled)} with a "
    "learning-rate multiplier"
  )
