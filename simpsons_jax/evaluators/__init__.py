"""Evaluators: what a model gets on a data set, one type per module.

An entry of `config.evals` names its type (`type=...`): a key of `EVALUATORS`
or, for an evaluator of your own, its class as 'module:Class'. The type owns
its data and its figures (`base.Evaluator`); the training loop runs each
entry every `every_epochs` epochs, `--mode=evaluate` runs the same code on a
checkpoint, e.g.

  config.evals.kaggle_test = dict(
      type="folder", dir="~/data/kaggle_simpson_testset", every_epochs=5)
  config.evals.unknown = dict(type="unknowns", dir="~/data/others")

Every evaluator scores through `scoring` (one jitted function; each data set
scored once per checkpoint however many evaluators read it), so a report
written during training and one written by `evaluate` from the same
checkpoint hold the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from simpsons_jax import errors, importing
from simpsons_jax.evaluators.base import Context, Evaluator, Result
from simpsons_jax.evaluators.scoring import (
  Data,
  Model,
  accumulate,
  batch_scores,
  report,
  scorer,
  write,
)

# Every evaluator type by name, as 'module:Class' (imported when used: TFDS
# loads only for tfds evaluators).
EVALUATORS: dict[str, str] = {
  "validation": "simpsons_jax.evaluators.classification:Validation",
  "folder": "simpsons_jax.evaluators.classification:Folder",
  "tfds": "simpsons_jax.evaluators.tfds_split:TfdsSplit",
  "calibration": "simpsons_jax.evaluators.calibration:Calibration",
  "unknowns": "simpsons_jax.evaluators.unknowns:Unknowns",
  "sets": "simpsons_jax.evaluators.sets:PredictionSets",
}


def evaluator_class(kind: str, where: str = "type") -> type[Evaluator]:
  """The class of an evaluator type: a name of `EVALUATORS` or 'module:Class'."""
  if kind not in EVALUATORS and ":" not in kind:
    raise errors.UserError(
      f"{where}={kind!r} must be one of {', '.join(EVALUATORS)}, or an "
      "evaluator class of your own as 'module:Class'"
    )
  found = importing.load(EVALUATORS.get(kind, kind), where)
  if not (isinstance(found, type) and issubclass(found, Evaluator)):
    raise errors.UserError(
      f"{where}={kind!r} is not an evaluator (a subclass of "
      "simpsons_jax.evaluators.Evaluator)"
    )
  return found


def problems(evals: Mapping[str, Any]) -> list[str]:
  """What is wrong with `config.evals`' entries, one phrase each."""
  found = []
  for name, spec in evals.items():
    kind = spec.get("type", "") if hasattr(spec, "get") else ""
    try:
      cls = evaluator_class(kind, f"evals.{name}.type")
    except errors.UserError as e:
      found.append(str(e))
      continue
    missing = [key for key in cls.required if not spec.get(key)]
    if missing:
      found.append(f"evals.{name} (type {kind}) needs {', '.join(missing)}")
    elif problem := cls.problem(spec):
      found.append(f"evals.{name} (type {kind}): {problem}")
  return found


def create(name: str, spec: Mapping[str, Any], context: Context) -> Evaluator:
  """The evaluator of one `config.evals` entry."""
  (problem,) = problems({name: spec}) or (None,)
  if problem:
    raise errors.UserError(f"Invalid evaluator: {problem}.")
  return evaluator_class(spec["type"])(name, spec, context)


def known_set(
  spec: Mapping[str, Any], key: str, context: Context, owner: str
) -> Evaluator:
  """The set of the model's characters that an evaluator comparing with one
  (calibration, unknowns) reads: the folder `spec[key]` if given, else the
  context's known set, else the run's validation split."""
  if spec.get(key):
    return create(owner, {"type": "folder", "dir": spec[key]}, context)
  if context.known is not None:
    return context.known
  return create(owner, {"type": "validation"}, context)


__all__ = [
  "EVALUATORS",
  "Context",
  "Data",
  "Evaluator",
  "Model",
  "Result",
  "accumulate",
  "batch_scores",
  "create",
  "evaluator_class",
  "known_set",
  "problems",
  "report",
  "scorer",
  "write",
]
