"""Starting a run from another run's weights.

`config.finetune.init_from = "WORKDIR[:best|latest|STEP]"` loads, at step 0 only, the
inference variables of another run's checkpoint (its EMA if it kept one:
the weights it was evaluated with) into the new model: every layer whose
path and shape match is loaded; the classification head is loaded whole when
the characters are the same, otherwise mapped column by column for the
characters the two runs share (by name) and freshly initialised for the
others. Any other difference is an error naming the layer. (Freezing and
slowing layers while fine-tuning: `freezing`.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from simpsons_jax import checkpointing, errors, trained

HEAD = "logits"  # The name of every model's classification layer.

if TYPE_CHECKING:
  from simpsons_jax import characters


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
    raise errors.UserError(
      f"init_from: the source run has layers this model lacks ({', '.join(extra[:5])}"
      f"{', ...' if len(extra) > 5 else ''}): use a model of the same family and "
      "layers."
    )
  merged, loaded_count, report = {}, 0, []
  for path, value in flat_fresh.items():
    if path not in flat_loaded:
      raise errors.UserError(
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
      raise errors.UserError(
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
    raise errors.UserError(
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
  """The variables a run starts from: `fresh` merged with those of
  `config.finetune.init_from`."""
  workdir, which = parse_init_from(config.finetune.init_from)
  try:
    source_config = checkpointing.load_config(workdir)
    if source_config.model.name != config.model.name:
      raise errors.UserError(
        f"{workdir} trained model={source_config.model.name}, this run "
        f"model={config.model.name}: start from a run of the same model."
      )
    source = trained.load(workdir, which)
  except errors.UserError as e:
    # The loaders speak of --workdir and --checkpoint: here the user wrote
    # --config.finetune.init_from=WORKDIR[:CHECKPOINT].
    said = str(e).replace("--workdir", "--config.finetune.init_from")
    said = said.replace("--checkpoint=", "the checkpoint ")
    raise errors.UserError(
      f"--config.finetune.init_from={config.finetune.init_from}: {said}"
    ) from None
  merged, report = merge(fresh, source.variables, cmap.names, source.cmap.names)
  logging.info(
    "Started from step %d of %s: %s.", source.step, workdir, "; ".join(report)
  )
  return merged


def start_from(
  state: Any,
  config: ml_collections.ConfigDict,
  cmap: characters.CharacterMap,
  placed: jax.sharding.Sharding,
) -> Any:
  """A fresh train state with `config.finetune.init_from`'s weights
  (`initialize`), placed with `placed`; its EMA, if it keeps one, starts
  from them too."""
  fresh = {"params": state.params, "batch_stats": state.batch_stats}
  merged = jax.device_put(initialize(jax.device_get(fresh), config, cmap), placed)
  ema = None
  if state.ema is not None:
    ema = jax.tree.map(jnp.copy, merged)  # No buffers shared: the state is donated.
  return state.replace(
    params=merged["params"], batch_stats=merged["batch_stats"], ema=ema
  )
