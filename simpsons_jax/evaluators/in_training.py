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
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from simpsons_jax import calibration, open_set, reporting, trained
from simpsons_jax.data import core
from simpsons_jax.evaluators import base, classification, scoring
from simpsons_jax.evaluators import create as create_evaluator

if TYPE_CHECKING:
  from simpsons_jax import characters


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
    train_split: core.Examples,
  ):
    context = base.Context(config, cmap, workdir)
    known, negatives = core.set_apart_negatives(val_split)
    self.validation = classification.Classification(
      "validation", {"type": "validation"}, context, examples=known
    )
    # The validation negatives choose the unknown score; a sample of the
    # training images is the knn score's bank.
    self.negatives = None if negatives is None else scoring.Data(negatives, config)
    self.bank = scoring.Data(_bank_sample(train_split, config.seed), config)
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


def _bank_sample(train_split: core.Examples, seed: int) -> core.Examples:
  """At most `open_set.BANK_SIZE` of the training split's character images,
  drawn with `seed`, in order."""
  known, _ = core.set_apart_negatives(train_split)
  keep = np.zeros(len(known), bool)
  rng = np.random.default_rng(seed)
  keep[rng.permutation(len(known))[: open_set.BANK_SIZE]] = True
  return known if keep.all() else known.select(keep)


def fit_after_training(
  evaluations: Evaluations,
  latest: scoring.Model,
  model_with: Callable[[int, Any], scoring.Model],
  manager,
) -> None:
  """Fits the temperature and the unknown score of the latest checkpoint
  (`latest`, the state in memory) and of the best one, restored
  (`model_with(step, variables)`), on the validation split."""
  workdir = evaluations.workdir
  steps = [latest.step]
  best = manager.best_step()
  if best is not None and best != latest.step and jax.process_count() == 1:
    steps.append(best)
  for step in sorted(steps):
    if step == latest.step:
      model = latest
    else:
      model = model_with(step, trained.load(workdir, str(step)).variables)
    record = _calibrate(evaluations.validation, model, workdir)
    model.calibration = record
    chosen = _choose_unknown_score(evaluations, model)
    if jax.process_index() == 0:
      open_set.save(workdir, step, chosen)


def _calibrate(
  validation: classification.Classification,
  model: scoring.Model,
  workdir: epath.Path,
) -> dict[str, Any]:
  """Fits, saves and returns the temperature of `model`'s checkpoint on
  `validation` (a `calibration.not_fitted` record when it is too small)."""
  rows: dict[str, Any] = model.outputs(validation.data)[1]
  examples = len(rows["labels"])
  if examples < calibration.MIN_EXAMPLES:
    logging.warning(
      "Not calibrated: %d validation images are too few to fit a temperature "
      "(at least %d); predictions use T = 1.",
      *(examples, calibration.MIN_EXAMPLES),
    )
    fitted = calibration.not_fitted(examples)
  else:
    fitted = calibration.record(rows["probabilities"], rows["labels"])
    logging.info(
      "Calibrated step %d on %d validation images: temperature %.3f, ECE %.4f -> "
      "%.4f, NLL %.4f -> %.4f.",
      *(model.step, fitted["examples"], fitted["temperature"]),
      *(fitted["ece"]["before"], fitted["ece"]["after"]),
      *(fitted["nll"]["before"], fitted["nll"]["after"]),
    )
  if jax.process_index() == 0:
    calibration.save(workdir, model.step, fitted)
  return fitted


def _choose_unknown_score(evaluations: Evaluations, model: scoring.Model) -> dict:
  """The unknown score and threshold of `model`'s checkpoint, chosen on the
  validation split (its negatives as unknowns), with the knn score's bank
  and the conformity scores of prediction sets (`open_set`)."""
  rows = model.outputs(evaluations.validation.data)[1]
  bank = open_set.Bank(model.outputs(evaluations.bank)[1]["features"])
  known = open_set.scores(rows, model.temperature, bank)
  unknown = None
  if evaluations.negatives is not None:
    negative_rows = model.outputs(evaluations.negatives)[1]
    unknown = open_set.scores(negative_rows, model.temperature, bank)
  correct = rows["probabilities"].argmax(-1) == rows["labels"]
  chosen = open_set.choose(
    known, correct, unknown, evaluations.config.data.unknown_share
  )
  calibrated = model.calibrated(evaluations.validation.data)
  chosen |= {
    "validation": {
      "known": len(correct),
      "negatives": len(unknown["energy"]) if unknown else 0,
    },
    "conformity": open_set.conformity(calibrated, rows["labels"]).round(7).tolist(),
    **open_set.encode_bank(bank),
  }
  logging.info(
    "Unknown score of step %d: %s, threshold %.4f (%s).",
    model.step,
    chosen["score"],
    chosen["threshold"],
    "AUROC " + ", ".join(f"{k} {v:.3f}" for k, v in chosen["auroc"].items())
    if "auroc" in chosen
    else "no negatives: the 95%-precision threshold",
  )
  return chosen
