"""How sure the model is: temperature scaling, calibration error, a threshold
chosen for a precision, and how well it tells unknown characters apart.

Temperature scaling (Guo et al. 2017): one scalar T fitted on the validation
split by minimising the negative log-likelihood of softmax(log p / T); it
leaves every argmax (hence accuracy) as it was. Training fits it for the best
and the latest checkpoint and keeps it, with the validation split's
confidences, in `<workdir>/calibration.json` (`save`, `load`); a run without
one uses T = 1. Everything here is NumPy in float64 on the host.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from simpsons_jax import errors, files

FILENAME = "calibration.json"
ECE_BINS = 15
# Fewer validation images leave the temperature to chance: T = 1 then.
MIN_EXAMPLES = 20
AUTO = re.compile(r"auto:precision=(0(?:\.\d+)?|1(?:\.0*)?)")


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
  """log p, with zeros held at the smallest float64 (no -inf)."""
  return np.log(np.maximum(np.asarray(probabilities, np.float64), np.finfo(float).tiny))


def with_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
  """softmax(log p / T) for each row of probabilities p."""
  z = log_probabilities(probabilities) / temperature
  z -= z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
  """The mean negative log-likelihood of the true labels."""
  rows = np.arange(len(labels))
  return float(-log_probabilities(probabilities)[rows, labels].mean())


def reliability(
  probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
  """Per equal-width confidence bin ((0, 1/bins], ...): the examples' count,
  mean confidence (max probability) and accuracy (0 where empty)."""
  confidence = np.asarray(probabilities).max(axis=-1)
  correct = np.asarray(probabilities).argmax(axis=-1) == np.asarray(labels)
  index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
  count = np.bincount(index, minlength=bins)
  safe = np.maximum(count, 1)
  return {
    "count": count,
    "confidence": np.bincount(index, confidence, bins) / safe,
    "accuracy": np.bincount(index, correct.astype(float), bins) / safe,
  }


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
  """Expected calibration error: the count-weighted mean of |accuracy -
  confidence| over equal-width confidence bins."""
  r = reliability(probabilities, labels, bins)
  return float(
    (r["count"] * np.abs(r["accuracy"] - r["confidence"])).sum() / len(labels)
  )


def ece_floor(
  probabilities: np.ndarray, bins: int = ECE_BINS, draws: int = 200, seed: int = 0
) -> float:
  """The median ECE that a perfectly calibrated model, as sure as this one
  on each image, would measure on this many images: each image's answer
  drawn right with probability its confidence, `draws` times. Measured ECE
  near it is sampling noise, not miscalibration (it shrinks as 1/sqrt(N))."""
  confidence = np.asarray(probabilities, np.float64).max(axis=-1)
  index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
  in_bin = np.eye(bins)[index]  # (N, bins)
  right = np.random.default_rng(seed).random((draws, len(confidence))) < confidence
  gaps = np.abs(right @ in_bin - confidence @ in_bin)  # (draws, bins): sums
  return float(np.median(gaps.sum(axis=-1)) / len(confidence))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
  """The T in [0.05, 20] minimising `nll(with_temperature(p, T), labels)`.

  The NLL is convex in 1/T: golden-section search on 1/T, to 1e-6.
  """
  z = log_probabilities(probabilities)
  true = z[np.arange(len(labels)), labels]

  def loss(beta: float) -> float:
    scaled = beta * z
    top = scaled.max(axis=-1)
    return float(
      (top + np.log(np.exp(scaled - top[:, None]).sum(-1)) - beta * true).mean()
    )

  low, high = 1 / 20, 1 / 0.05
  ratio = (np.sqrt(5) - 1) / 2
  a, b = high - ratio * (high - low), low + ratio * (high - low)
  fa, fb = loss(a), loss(b)
  while high - low > 1e-6:
    if fa <= fb:
      high, b, fb = b, a, fa
      a = high - ratio * (high - low)
      fa = loss(a)
    else:
      low, a, fa = a, b, fb
      b = low + ratio * (high - low)
      fb = loss(b)
  return float(2 / (low + high))


def threshold_for_precision(
  confidence: np.ndarray,
  correct: np.ndarray,
  precision: float,
  weights: np.ndarray | None = None,
) -> tuple[float, float]:
  """The lowest probability at which the images answered (confidence at
  least it) are at least `precision` right, and the share answered; each
  image counts `weights` (default 1). Above every confidence (1.0 and
  coverage 0) when no threshold reaches it."""
  order = np.argsort(-np.asarray(confidence), kind="stable")
  conf = np.asarray(confidence, np.float64)[order]
  weight = np.ones(len(conf)) if weights is None else np.asarray(weights, np.float64)
  weight = weight[order]
  right = np.cumsum(np.asarray(correct, np.float64)[order] * weight)
  # Only the last of equal confidences is a place to cut: ties go together.
  last = np.append(conf[1:] != conf[:-1], True)
  answered = np.cumsum(weight)
  ok = last & (right >= (precision - 1e-12) * answered)
  if not ok.any():
    return 1.0 + 1e-9, 0.0
  k = np.flatnonzero(ok).max()
  return float(conf[k]), float(answered[k] / answered[-1])


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
  """The probability that a known image scores higher than an unknown one
  (ties count half): the area under the ROC curve of known vs unknown."""
  scores = np.concatenate([known, unknown]).astype(np.float64)
  order = np.argsort(scores, kind="stable")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  starts = np.flatnonzero(np.append(True, sorted_scores[1:] != sorted_scores[:-1]))
  ends = np.append(starts[1:], len(scores))
  for start, end in zip(starts, ends, strict=True):
    ranks[order[start:end]] = (start + end + 1) / 2  # 1-based mean rank.
  n, m = len(known), len(unknown)
  return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def record(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """The fitted temperature of a checkpoint with its validation figures and
  the calibrated confidences (for thresholds chosen later)."""
  temperature = fit_temperature(probabilities, labels)
  calibrated = with_temperature(probabilities, temperature)
  return {
    "temperature": temperature,
    "examples": len(labels),
    "nll": {"before": nll(probabilities, labels), "after": nll(calibrated, labels)},
    "ece": {
      "before": ece(probabilities, labels),
      "after": ece(calibrated, labels),
      "floor": ece_floor(calibrated),
    },
    "validation": {
      "confidence": calibrated.max(axis=-1).round(7).tolist(),
      "correct": (calibrated.argmax(axis=-1) == labels).astype(int).tolist(),
    },
  }


def save(workdir: str | os.PathLike, step: int, fitted: Mapping[str, Any]) -> None:
  """Adds (or replaces) checkpoint `step`'s record in the workdir's file."""
  records = load(workdir)
  records[str(step)] = dict(fitted)
  path = files.as_path(workdir) / FILENAME
  files.write_text_atomic(path, json.dumps(records, indent=1) + "\n")


def not_fitted(examples: int) -> dict[str, Any]:
  """The record of a checkpoint whose validation split was too small to fit
  a temperature (it predicts with T = 1)."""
  return {"fitted": False, "examples": examples}


def is_fitted(record: Mapping[str, Any]) -> bool:
  """Whether a record holds a fitted temperature (not {} or `not_fitted`)."""
  return "temperature" in record


def load(workdir: str | os.PathLike) -> dict[str, Any]:
  """Every checkpoint's record ({} for a run trained before calibration),
  each checked (`checked`): a damaged file is one sentence, never trusted."""
  path = files.as_path(workdir) / FILENAME
  if not path.exists():
    return {}
  fix = "delete it to predict with T = 1, or train the run again"
  records = files.read_json(path, fix)
  if not isinstance(records, dict):
    raise files.DamagedFileError(f"{path} is damaged (not a JSON object): {fix}")
  for step, record in records.items():
    if not step.isdigit():
      raise files.DamagedFileError(f"{path} is damaged (a key {step!r}): {fix}")
    checked(record, f"{path} (step {step})", fix)
  return records


def checked(record: Any, where: str, fix: str) -> dict[str, Any]:
  """`record` if it is a calibration record that can be trusted: a finite,
  positive temperature and validation confidences in [0, 1], each with a 0
  or 1 for right, or a `not_fitted` record; else DamagedFileError naming
  `where` and `fix`. A temperature of 0, a negative or NaN one would make
  every probability NaN or invert every answer."""

  def damaged(why: str) -> files.DamagedFileError:
    return files.DamagedFileError(f"{where} is damaged ({why}): {fix}")

  if not isinstance(record, dict):
    raise damaged(f"a {type(record).__name__}, not a JSON object")
  if not is_fitted(record):
    if record and not (record.get("fitted") is False and _count(record)):
      raise damaged("no temperature")
    return record
  temperature = record["temperature"]
  if not _number(temperature) or not (math.isfinite(temperature) and temperature > 0):
    raise damaged(f"temperature {temperature!r}: it must be a finite number above 0")
  if "validation" in record:
    shown = record["validation"]
    confidence = shown.get("confidence") if isinstance(shown, dict) else None
    correct = shown.get("correct") if isinstance(shown, dict) else None
    if not (isinstance(confidence, list) and isinstance(correct, list)):
      raise damaged("validation.confidence and .correct must be lists")
    if len(confidence) != len(correct):
      raise damaged(
        f"{len(confidence)} validation confidences but {len(correct)} answers"
      )
    if not all(_number(c) and 0 <= c <= 1 for c in confidence):
      raise damaged("a validation confidence outside [0, 1]")
    if not all(c in (0, 1) and not isinstance(c, float) for c in correct):
      raise damaged("a validation answer that is not 0 or 1")
  return record


def _number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


def _count(record: Mapping[str, Any]) -> bool:
  examples = record.get("examples")
  return isinstance(examples, int) and not isinstance(examples, bool) and examples >= 0


def parse_threshold(value: str) -> float | None:
  """`--threshold` checked without a run: the probability it gives (None for
  'auto:precision=P', chosen later on a run's validation split); UserError
  in one sentence when it is neither a probability in [0, 1] nor that."""
  if AUTO.fullmatch(value) or value == "auto":
    return None
  try:
    number = float(value)
  except ValueError:
    number = None
  if number is None or not 0 <= number <= 1:
    raise errors.UserError(
      f"--threshold={value}: give auto, a probability in [0, 1] (0.8), or "
      "auto:precision=P with P in [0, 1] (auto:precision=0.95)."
    )
  return number


def threshold(value: str, fitted: Mapping[str, Any]) -> tuple[float, str]:
  """`--threshold` as a probability: a number, or 'auto:precision=P' chosen
  on the validation split of `fitted` (a checkpoint's record); and a line
  saying what was chosen. 'auto' (the run's own unknown score, `trained`'s
  to apply) asks nothing of the probability: 0."""
  if value == "auto":
    return 0.0, ""
  number = parse_threshold(value)
  if number is not None:
    return number, ""
  if "validation" not in fitted:
    if fitted.get("fitted") is False:
      why = (
        f"its validation split had {fitted['examples']} images, too few to "
        f"calibrate (at least {MIN_EXAMPLES}); give a probability instead "
        "(--threshold=0.8), or train again with a larger "
        "--config.data.val_fraction"
      )
    else:
      why = (
        "this checkpoint has no calibration (trained before it existed); give "
        "a probability instead (--threshold=0.8), or train again"
      )
    raise errors.UserError(f"--threshold={value}: {why}.")
  precision = float(AUTO.fullmatch(value)[1])
  chosen, coverage = threshold_for_precision(
    np.asarray(fitted["validation"]["confidence"]),
    np.asarray(fitted["validation"]["correct"]),
    precision,
  )
  return chosen, (
    f"--threshold={value}: {chosen:.4f}, which answers {coverage:.1%} of the "
    f"validation images at a precision of at least {precision:.0%}"
  )
