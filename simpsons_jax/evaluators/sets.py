"""Prediction sets with a coverage guarantee (`type="sets"`, `coverage=0.9`):
on a set of the model's characters (`dir=...`; default: the run's validation
split, or the set `evaluate` scores), each image's conformal set
(`open_set.prediction_sets`, its quantile from the run's validation
conformity scores) and how often it holds the true character (`coverage`),
with its mean size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from simpsons_jax import evaluators, open_set
from simpsons_jax.evaluators import base, scoring

DEFAULT_COVERAGE = 0.9


class PredictionSets(base.Evaluator):
  """See the module docstring."""

  def __init__(self, name: str, spec: Mapping[str, Any], context: base.Context):
    super().__init__(name, spec, context)
    self.known = evaluators.known_set(spec, "dir", context, name)
    self.coverage = float(spec.get("coverage", DEFAULT_COVERAGE))

  @classmethod
  def problem(cls, spec: Mapping[str, Any]) -> str | None:
    coverage = spec.get("coverage", DEFAULT_COVERAGE)
    if not isinstance(coverage, int | float) or not 0 < coverage < 1:
      return f"coverage={coverage!r} must lie in (0, 1)"
    return None

  def run(self, model: scoring.Model, draw_in: epath.Path | None = None) -> base.Result:
    del draw_in  # Nothing drawn.
    threshold = open_set.coverage_threshold(model.open_set, self.coverage)
    probabilities = model.calibrated(self.known.data)
    labels = model.outputs(self.known.data)[1]["labels"]
    sets = open_set.prediction_sets(probabilities, threshold)
    held = np.asarray([label in s for label, s in zip(labels, sets, strict=True)])
    report = {
      "coverage_asked": self.coverage,
      "coverage": float(held.mean()),
      "mean_size": float(np.mean([len(s) for s in sets])),
      "threshold": threshold,
      "images": len(sets),
    }
    scalars = {k: report[k] for k in ("coverage", "mean_size")}
    return base.Result(scalars, report)
