"""What the training loop evaluates: its validation split every epoch (the
figures that rank checkpoints), and the evaluators of `config.evals` at the
end of their epochs, which compare with that split unless their entry names
another set. Their reports go to `<workdir>/eval/<name>/`, their figures to
the log and TensorBoard."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from simpsons_jax import characters, reporting
from simpsons_jax.data import core
from simpsons_jax.evaluators import base, classification, scoring
from simpsons_jax.evaluators import create as create_evaluator


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
