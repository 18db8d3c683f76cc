"""Name the character in image files with a trained workdir.

Only what inference needs is read: `config.json` (the model's shape),
`characters.json` and the inference variables of one checkpoint, restored onto the
first local device, whatever number of devices wrote them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simpsons_jax import characters, checkpointing, input_pipeline, models

UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A model with the variables of one checkpoint and its characters."""

  model: nn.Module
  variables: Any  # {"params", "batch_stats"}: the EMA ones if the run kept one.
  cmap: characters.CharacterMap
  config: ml_collections.ConfigDict
  step: int


def load_config_and_map(
  workdir: str | os.PathLike,
) -> tuple[ml_collections.ConfigDict, characters.CharacterMap]:
  """The config and the character map a workdir was trained with."""
  config = checkpointing.load_config(workdir)
  return config, characters.CharacterMap.load(Path(workdir) / characters.MAP_FILENAME)


def load(workdir: str | os.PathLike, checkpoint: str = "best") -> TrainedModel:
  """Loads the `checkpoint` ('best', 'latest' or a step) of a trained workdir."""
  config, cmap = load_config_and_map(workdir)
  model = models.create(config, cmap.num_classes)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.uint8)
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.PRNGKey(0), images
  )
  shapes = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = checkpointing.abstract_like(shapes, device)
  manager = checkpointing.create_manager(workdir, read_only=True)
  step = checkpointing.select_step(manager, checkpoint)
  if config.get("ema_decay", 0.0) > 0:
    variables = checkpointing.restore_fields(manager, step, {"ema": abstract})["ema"]
  else:
    variables = checkpointing.restore_fields(manager, step, abstract)
  manager.close()
  return TrainedModel(model, variables, cmap, config, step)


def probabilities(
  trained: TrainedModel, batches: Sequence[input_pipeline.Batch]
) -> np.ndarray:
  """Softmax probabilities (N, characters) of the real rows of padded batches."""

  flip = trained.config.get("eval_flip", False)

  @jax.jit
  def forward(variables, images):
    logits = models.inference_logits(trained.model.apply, variables, images, flip)
    return jax.nn.softmax(logits)

  probs = [forward(trained.variables, batch["image"]) for batch in batches]
  masks = [batch["mask"].astype(bool) for batch in batches]
  return np.concatenate(
    [np.asarray(p)[m] for p, m in zip(probs, masks, strict=True)]
  ).reshape(-1, trained.cmap.num_classes)


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
  """Files as given, and the images inside folders (recursively, sorted)."""
  files = []
  for path in map(Path, paths):
    if path.is_dir():
      files += sorted(
        p
        for p in path.rglob("*")
        if p.suffix.lower() in characters.IMAGE_EXTENSIONS and p.is_file()
      )
    elif path.is_file():
      files.append(path)
    else:
      raise FileNotFoundError(f"{path} does not exist.")
  return files


def classify(
  trained: TrainedModel,
  paths: Sequence[str | os.PathLike],
  top_k: int = 3,
  threshold: float = 0.0,
  batch_size: int = 64,
) -> list[dict[str, Any]]:
  """Top-k characters per image; `character` is 'unknown' below `threshold`."""
  files = expand_paths(paths)
  split = input_pipeline.Split(
    np.asarray([str(f) for f in files], dtype=str), np.zeros(len(files), np.int32)
  )
  batches = input_pipeline.eval_batches(split, trained.config.image_size, batch_size)
  probs = probabilities(trained, batches)
  results = []
  for path, p in zip(files, probs, strict=True):
    order = np.argsort(-p)[: min(top_k, len(p))]
    top = [
      {"character": trained.cmap.names[i], "probability": float(p[i])} for i in order
    ]
    best = top[0]["character"] if top[0]["probability"] >= threshold else UNKNOWN
    results.append({"path": str(path), "character": best, "top": top})
  return results


def run(
  workdir: str | os.PathLike,
  paths: Sequence[str],
  top_k: int = 3,
  threshold: float = 0.0,
  checkpoint: str = "best",
  output: str = "",
) -> list[dict[str, Any]]:
  """Classifies `paths`, prints one line per image and optionally writes JSON."""
  trained = load(workdir, checkpoint)
  results = classify(trained, paths, top_k, threshold)
  for result in results:
    guesses = ", ".join(
      f"{t['character']} {t['probability']:.3f}" for t in result["top"]
    )
    print(f"{result['path']}: {result['character']}  ({guesses})")
  if output:
    Path(output).write_text(json.dumps(results, indent=2) + "\n")
  return results
