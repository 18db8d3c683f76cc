"""How sure the model is, against how often it is right (`type="calibration"`).

On a set of the model's characters (`dir=...`, a folder in either Kaggle
layout; default: the run's validation split): the expected calibration error
(15 bins) and the negative log-likelihood without and with the checkpoint's
temperature, the ECE a perfectly calibrated model would measure on as many
images (`ece.floor`), and for a calibrated checkpoint the share of images the
validation-chosen 95%-precision threshold answers and how many of those are
right. Drawn: the reliability diagram before and after.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from etils import epath

from simpsons_jax import calibration, evaluators, plots
from simpsons_jax.evaluators import base

if TYPE_CHECKING:
  from simpsons_jax.evaluators import scoring


class Calibration(base.Evaluator):
  """The calibration figures of a known set (see the module docstring)."""

  def __init__(
    self,
    name: str,
    spec: Mapping[str, Any],
    context: base.Context,
  ):
    super().__init__(name, spec, context)
    self.known = evaluators.known_set(spec, "dir", context, name)

  def run(self, model: scoring.Model, draw_in: epath.Path | None = None) -> base.Result:
    rows = model.outputs(self.known.data)[1]
    raw, labels = rows["probabilities"], rows["labels"]
    calibrated = model.calibrated(self.known.data)
    fitted = calibration.is_fitted(model.calibration)
    report = {
      "temperature": model.temperature,
      "fitted": fitted,
      "ece": {
        "uncalibrated": calibration.ece(raw, labels),
        "calibrated": calibration.ece(calibrated, labels),
        "floor": calibration.ece_floor(calibrated),
      },
      "nll": {
        "uncalibrated": calibration.nll(raw, labels),
        "calibrated": calibration.nll(calibrated, labels),
      },
      "bins": calibration.ECE_BINS,
    }
    if fitted:
      report["at_95_precision"] = answered_at(model, calibrated, labels, 0.95)
    scalars = {
      f"{kind}.{when}": report[kind][when]
      for kind in ("ece", "nll")
      for when in ("uncalibrated", "calibrated")
    }
    images = {}
    if draw_in is not None:
      images["reliability"] = plots.reliability_diagram(
        calibration.reliability(raw, labels),
        calibration.reliability(calibrated, labels),
        draw_in / "reliability.png",
        f"{self.known.name}: ECE {report['ece']['uncalibrated']:.1%} -> "
        f"{report['ece']['calibrated']:.1%} (T = {model.temperature:.2f})",
      )
    return base.Result(scalars, report, images)


def answered_at(
  model: scoring.Model, calibrated: np.ndarray, labels: np.ndarray, precision: float
) -> dict[str, float | None]:
  """At the threshold chosen on the validation split for `precision`: the
  share of these images answered, and how many of those are right (None
  when none is)."""
  threshold = model.threshold(f"auto:precision={precision}")
  answered = calibrated.max(-1) >= threshold
  right = calibrated.argmax(-1) == labels
  return {
    "threshold": threshold,
    "answered": float(answered.mean()),
    "precision": float(right[answered].mean()) if answered.any() else None,
  }
