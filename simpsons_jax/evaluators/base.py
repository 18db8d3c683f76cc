"""What every evaluator is: a type of evaluation that owns its data and its
figures.

An evaluator is made from an entry of `config.evals` (its `spec`: `type`,
`every_epochs` and its own keys) and the run it belongs to (`Context`), and
`run(model)` gives a `Result`: named figures (logged and written to
TensorBoard), the report (JSON) and, when asked to draw, pictures. The
training loop and `--mode=evaluate` call the same `run`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np
from etils import epath

if TYPE_CHECKING:
  from simpsons_jax import characters
  from simpsons_jax.evaluators import scoring


@dataclasses.dataclass(frozen=True)
class Context:
  """The run an evaluator belongs to: its config, characters and workdir;
  `report_dir` takes the file checks of the data it reads (None: not
  written, on processes other than 0); `known`, the set of the model's
  characters that evaluators comparing with one use when their entry names
  none (a `classification.Classification`: the training loop's validation
  split, or the set `evaluate` scores; None: the run's validation split)."""

  config: ml_collections.ConfigDict
  cmap: characters.CharacterMap
  workdir: epath.Path
  report_dir: epath.Path | None = None
  known: Any = None


@dataclasses.dataclass
class Result:
  """What one evaluation found."""

  scalars: dict[str, float]  # Named figures ('accuracy', 'ece.calibrated').
  report: dict[str, Any]  # Everything, as JSON (report.json).
  images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Evaluator(abc.ABC):
  """One type of evaluation. Subclasses list the keys their entries need
  (`required`), may say what else is wrong with an entry (`problem`), and
  implement `run`."""

  required: tuple[str, ...] = ()

  def __init__(self, name: str, spec: Mapping[str, Any], context: Context):
    self.name, self.spec, self.context = name, dict(spec), context

  @property
  def every_epochs(self) -> int:
    """How often the training loop runs it (at the end of those epochs)."""
    return int(self.spec.get("every_epochs", 1))

  @classmethod
  def problem(cls, spec: Mapping[str, Any]) -> str | None:
    """What is wrong with an entry beyond a missing key (a phrase), or None."""
    del spec
    return None

  @abc.abstractmethod
  def run(self, model: scoring.Model, draw_in: epath.Path | None = None) -> Result:
    """The figures of `model` here; with `draw_in`, its pictures drawn there."""
