"""A finished run, for everything that uses one: predict, evaluate, export,
serve, video and fine-tuning (`config.finetune.init_from`, the training loop's only way
here).

Only what inference needs is read: `config.json` (the model's shape),
`characters.json` and the inference variables of one checkpoint, restored onto
the first local device, whatever number of devices wrote them. One softmax
pass (`softmax_probabilities`) serves predict, export, serve and video
(evaluate scores through `evaluators`, as the training loop does).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from simpsons_jax import (
  calibration,
  characters,
  checkpointing,
  files,
  inference,
  models,
  padding,
)

if TYPE_CHECKING:
  from simpsons_jax import answers


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A model with the variables of one checkpoint and its characters."""

  model: nn.Module
  variables: Any  # {"params", "batch_stats"}: the EMA ones if the run kept one.
  cmap: characters.CharacterMap
  config: ml_collections.ConfigDict
  step: int
  meta: dict[str, Any]  # The checkpoint's: epoch, validation figures ('val'), ...
  # Its temperature and validation confidences (`calibration.record`); {}
  # for a run trained before calibration, or `calibration.not_fitted` for one
  # too small to calibrate: both use T = 1.
  calibration: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def temperature(self) -> float:
    """The checkpoint's fitted temperature (1.0 if it has none)."""
    return float(self.calibration.get("temperature", 1.0))

  def threshold(self, value: str | float) -> float:
    """`--threshold` as a probability: a number, or 'auto:precision=P'
    chosen on this checkpoint's validation split (logged)."""
    chosen, said = calibration.threshold(str(value), self.calibration)
    if said:
      logging.info("%s.", said)
    return chosen


def load_config_and_map(
  workdir: str | os.PathLike,
) -> tuple[ml_collections.ConfigDict, characters.CharacterMap]:
  """The config and the character map a workdir was trained with."""
  config = checkpointing.load_config(workdir)
  return config, characters.CharacterMap.load(
    files.as_path(workdir) / characters.MAP_FILENAME
  )


def load(workdir: str | os.PathLike, checkpoint: str = "best") -> TrainedModel:
  """Loads the `checkpoint` ('best', 'latest' or a step) of a trained workdir."""
  config, cmap = load_config_and_map(workdir)
  model = models.create(config, cmap.num_classes)
  shapes = jax.eval_shape(
    functools.partial(models.init_variables, model, config.data.image_size),
    jax.random.PRNGKey(0),
  )
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = checkpointing.abstract_like(shapes, device)
  metric = config.ckpt.metric
  manager = checkpointing.create_manager(workdir, read_only=True, metric=metric)
  step = checkpointing.select_step(manager, checkpoint)
  meta = checkpointing.restore_meta(manager, step)
  checkpointing.check_meta(
    meta,
    cmap.names,
    config.data.image_size,
    f"step {step} in {manager.directory}",
  )
  if config.optim.ema_decay > 0:
    variables = checkpointing.restore_fields(manager, step, {"ema": abstract})["ema"]
  else:
    variables = checkpointing.restore_fields(manager, step, abstract)
  manager.close()
  fitted = calibration.load(workdir).get(str(step), {})
  return TrainedModel(model, variables, cmap, config, step, meta, fitted)


def softmax_probabilities(
  apply: Callable[..., jax.Array],
  variables: Any,
  images: jax.Array,
  flip: bool,
  temperature: float = 1.0,
) -> jax.Array:
  """uint8 images (B, S, S, 3) -> softmax probabilities (B, characters), with
  the run's test-time augmentation (`flip`) and calibration temperature."""
  logits = inference.logits(apply, variables, images, flip)
  return jax.nn.softmax(logits / temperature)


_jitted = jax.jit(softmax_probabilities, static_argnums=(0, 3))


def _forward(trained: TrainedModel, images: np.ndarray) -> jax.Array:
  flip, temperature = trained.config.test_time_flip, trained.temperature
  return _jitted(trained.model.apply, trained.variables, images, flip, temperature)


def classifier(trained: TrainedModel, batch_size: int) -> answers.Classifier:
  """A function from uint8 images (N, S, S, 3), any N, to their probabilities
  (N, characters), run in padded batches of `batch_size` (one compilation)."""

  def classify(images: np.ndarray) -> np.ndarray:
    probs = []
    for start in range(0, len(images), batch_size):
      chunk = images[start : start + batch_size]
      padded = padding.pad(chunk, batch_size)
      probs.append(np.asarray(_forward(trained, padded))[: len(chunk)])
    return np.concatenate(probs)

  return classify
