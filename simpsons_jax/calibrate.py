"""A finished training run's temperatures, fitted on its validation split:
the latest checkpoint's and the best one's (`calibration.record`), kept in
`<workdir>/calibration.json` by process 0. Too small a split (fewer than
`calibration.MIN_EXAMPLES` images) is recorded as not fitted: T = 1. A
multi-process run fits the latest only (the best restores on one device)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from etils import epath

from simpsons_jax import calibration, trained
from simpsons_jax.evaluators import classification, scoring


def fit_run(
  validation: classification.Classification,
  latest: scoring.Model,
  model_with: Callable[[int, Any], scoring.Model],
  workdir: epath.Path,
  manager,
) -> None:
  """Fits the latest checkpoint (`latest`, the state in memory) and the best
  one, restored (`model_with(step, variables)`), on `validation`."""
  steps = [latest.step]
  best = manager.best_step()
  if best is not None and best != latest.step and jax.process_count() == 1:
    steps.append(best)

  def model_at(step: int) -> scoring.Model:
    if step == latest.step:
      return latest
    return model_with(step, trained.load(workdir, str(step)).variables)

  fit(validation, model_at, steps, workdir)


def fit(
  validation: classification.Classification,
  model_at: Callable[[int], scoring.Model],
  steps: list[int],
  workdir: epath.Path,
) -> None:
  """Fits and saves the temperature of each of `steps` (`model_at(step)`:
  the model of that checkpoint) on `validation`."""
  for step in sorted(steps):
    rows: dict[str, Any] = model_at(step).outputs(validation.data)[1]
    examples = len(rows["labels"])
    if examples < calibration.MIN_EXAMPLES:
      logging.warning(
        "Not calibrated: %d validation images are too few to fit a temperature "
        "(at least %d); predictions use T = 1.",
        *(examples, calibration.MIN_EXAMPLES),
      )
      if jax.process_index() == 0:
        for unfitted in steps:
          calibration.save(workdir, unfitted, calibration.not_fitted(examples))
      return
    fitted = calibration.record(rows["probabilities"], rows["labels"])
    if jax.process_index() == 0:
      calibration.save(workdir, step, fitted)
    logging.info(
      "Calibrated step %d on %d validation images: temperature %.3f, ECE %.4f -> "
      "%.4f, NLL %.4f -> %.4f.",
      *(step, fitted["examples"], fitted["temperature"]),
      *(fitted["ece"]["before"], fitted["ece"]["after"]),
      *(fitted["nll"]["before"], fitted["nll"]["after"]),
    )
