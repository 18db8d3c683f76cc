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
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from simpsons_jax import (
  answers,
  calibration,
  characters,
  checkpointing,
  files,
  inference,
  models,
  open_set,
  padding,
)


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
  # Its unknown score and threshold chosen on validation (`open_set.fit`'s
  # record); {} for a run trained before them.
  open_set: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def temperature(self) -> float:
    """The checkpoint's fitted temperature (1.0 if it has none)."""
    return float(self.calibration.get("temperature", 1.0))

  def rule(self, value: str | float) -> answers.UnknownRule:
    """`--threshold` as the rule answering 'unknown': 'auto', the run's own
    score and threshold (`open_set`; never 'unknown' for a run without
    them); a probability or 'auto:precision=P' on the maximum calibrated
    probability (chosen on this checkpoint's validation split). Logged."""
    return unknown_rule(str(value), self.calibration, self.open_set)


def unknown_rule(
  value: str, calibrated: dict[str, Any], chosen: dict[str, Any]
) -> answers.UnknownRule:
  """`--threshold`'s rule (see `TrainedModel.rule`) for a checkpoint with
  the calibration record `calibrated` and the open-set record `chosen`."""
  if value == answers.AUTO:
    if chosen:
      logging.info(
        "Unknown: %s below %.4f (chosen on the validation split).",
        chosen["score"],
        chosen["threshold"],
      )
      bank = open_set.decode_bank(chosen)
      return answers.UnknownRule(chosen["score"], chosen["threshold"], bank)
    return answers.UnknownRule("max_probability", 0.0)
  threshold, said = calibration.threshold(value, calibrated)
  if said:
    logging.info("%s.", said)
  return answers.UnknownRule("max_probability", threshold)


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
  chosen = open_set.load(workdir).get(str(step), {})
  return TrainedModel(model, variables, cmap, config, step, meta, fitted, chosen)


def softmax_probabilities(
  apply: Callable[..., jax.Array],
  variables: Any,
  images: jax.Array,
  flip: bool,
  temperature: float = 1.0,
) -> jax.Array:
  """uint8 images (B, S, S, 3) -> softmax probabilities (B, characters), with
  the run's test-time augmentation (`flip`) and calibration temperature."""
  return outputs(apply, variables, images, flip, temperature)["probabilities"]


def outputs(
  apply: Callable[..., jax.Array],
  variables: Any,
  images: jax.Array,
  flip: bool,
  temperature: float = 1.0,
) -> dict[str, jax.Array]:
  """uint8 images -> the calibrated probabilities and what the unknown
  scores read (`open_set.score_of`): max_logit, logsumexp, features."""
  logits, raw, features = inference.outputs(apply, variables, images, flip)
  return {
    "probabilities": jax.nn.softmax(logits / temperature),
    "max_logit": raw.max(-1),
    "logsumexp": jax.nn.logsumexp(raw, axis=-1),
    "features": features,
  }


_jitted = jax.jit(outputs, static_argnums=(0, 3))


def classifier(
  trained: TrainedModel, batch_size: int, rule: answers.UnknownRule | None = None
) -> answers.Classifier:
  """A function from uint8 images (N, S, S, 3), any N, to their calibrated
  probabilities (N, characters) and their `rule`'s unknown score (N,) (the
  maximum probability without a rule), run in padded batches of
  `batch_size` (one compilation)."""
  rule = rule or answers.UnknownRule("max_probability", 0.0)
  flip, temperature = trained.config.test_time_flip, trained.temperature

  def classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, scores = [], []
    for start in range(0, len(images), batch_size):
      chunk = images[start : start + batch_size]
      found = _jitted(
        trained.model.apply,
        trained.variables,
        padding.pad(chunk, batch_size),
        flip,
        temperature,
      )
      found = {k: np.asarray(v)[: len(chunk)] for k, v in found.items()}
      probs.append(found["probabilities"])
      scores.append(open_set.score_of(rule.score, found, rule.bank))
    return np.concatenate(probs), np.concatenate(scores)

  return classify
