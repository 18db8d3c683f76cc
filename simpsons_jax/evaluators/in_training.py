"""What the training loop evaluates: its validation split every epoch (the
figures that rank checkpoints), and the evaluators of `config.evals` at the
end of their epochs, which compare with that split unless their entry names
another set. Their reports go to `<workdir>/eval/<name>/`, their figures to
the log and TensorBoard.

At the end of training the run's temperatures are fitted on the validation
split: the latest checkpoint's and the best one's (`calibration.record`),
kept in `<workdir>/calibration.json` by process 0. Too small a split (fewer
than `calibration.MIN_EXAMPLES` images) is recorded as not fitted: T = 1. A
multi-process run fits the latest only (the best restores on one device)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from simpsons_jax import calibration, reporting, trained
from simpsons_jax.evaluators import base, classification, scoring
from simpsons_jax.evaluators import create as create_evaluator

if TYPE_CHECKING:
  from simpsons_jax import characters
  from simpsons_jax.data import core


class Evaluations:
  """What the loop evaluates: the validation split every epoch, and the
  evaluators of `config.evals` (which compare with that split by default)."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    cmap: characters.CharacterMap,
    workdir: epath.Path,
    mesh: Mesh,
    apply_fn: Callable,
    val_split: core.Examples,
  ):
    context = base.Context(config, cmap, workdir)
    self.validation = classification.Classification(
      "validation", {"type": "validation"}, context, examples=val_split
    )
    self.extra = from_config(
      config, dataclasses.replace(context, known=self.validation)
    )
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self._score = scoring.scorer(
      mesh, apply_fn, cmap.num_classes, config.test_time_flip
    )

  def model(self, step: int, variables: Any) -> scoring.Model:
    """The model under evaluation at `step`, with `variables`."""
    return scoring.Model(self._score, variables, self.mesh, step)

  def run_extra(self, model: scoring.Model, epoch: int) -> None:
    """Runs the extra evaluators due at the end of `epoch`: their reports in
    `<workdir>/eval/<name>/`, their figures in the log and TensorBoard."""
    for evaluator in self.extra:
      if epoch % evaluator.every_epochs:
        continue
      found = evaluator.run(model)
      report = {"checkpoint_step": model.step, **found.report}
      size = f"{report['num_examples']} images" if "num_examples" in report else ""
      reporting.evaluation(evaluator.name, model.step, found.scalars, size)
      if jax.process_index() == 0:
        board = self.workdir / "tensorboard" / f"eval_{evaluator.name}"
        out = self.workdir / "eval" / evaluator.name
        scoring.write(report, out, board, model.step, scalars=found.scalars)


def from_config(
  config: ml_collections.ConfigDict, context: base.Context
) -> list[base.Evaluator]:
  """The evaluators of `config.evals`; their file checks go under
  `<workdir>/eval/<name>` on process 0."""
  made = []
  for name, spec in config.evals.items():
    folder = context.workdir / "eval" / name if jax.process_index() == 0 else None
    here = dataclasses.replace(context, report_dir=folder)
    made.append(create_evaluator(name, spec.to_dict(), here))
  return made


def fit_calibration(
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

  _fit(validation, model_at, steps, workdir)


def _fit(
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
