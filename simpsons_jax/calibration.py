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
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from simpsons_jax import files

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
  confidence: np.ndarray, correct: np.ndarray, precision: float
) -> tuple[float, float]:
  """The lowest probability at which the images answered (confidence at
  least it) are at least `precision` right, and the share answered. Above
  every confidence (1.0 and coverage 0) when no threshold reaches it."""
  order = np.argsort(-np.asarray(confidence), kind="stable")
  conf = np.asarray(confidence, np.float64)[order]
  right = np.cumsum(np.asarray(correct, np.float64)[order])
  # Only the last of equal confidences is a place to cut: ties go together.
  last = np.append(conf[1:] != conf[:-1], True)
  answered = np.arange(1, len(conf) + 1)
  ok = last & (right / answered >= precision - 1e-12)
  if not ok.any():
    return 1.0 + 1e-9, 0.0
  k = np.flatnonzero(ok).max()
  return float(conf[k]), float((k + 1) / len(conf))


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


def load(workdir: str | os.PathLike) -> dict[str, Any]:
  """Every checkpoint's record ({} for a run trained before calibration)."""
  path = files.as_path(workdir) / FILENAME
  if not path.exists():
    return {}
  return files.read_json(path, "delete it to use T = 1, or train again")


def threshold(value: str, fitted: Mapping[str, Any]) -> tuple[float, str]:
  """`--threshold` as a probability: a number, or 'auto:precision=P' chosen
  on the validation split of `fitted`; and a line saying what was chosen."""
  match = AUTO.fullmatch(value)
  if not match:
    try:
      return float(value), ""
    except ValueError:
      raise ValueError(
        f"--threshold={value}: give a probability (0.8) or auto:precision=P "
        "(auto:precision=0.95)."
      ) from None
  if "validation" not in fitted:
    raise ValueError(
      f"--threshold={value}: this run has no calibration (trained before it "
      "existed); give a probability instead, or train again."
    )
  precision = float(match[1])
  chosen, coverage = threshold_for_precision(
    np.asarray(fitted["validation"]["confidence"]),
    np.asarray(fitted["validation"]["correct"]),
    precision,
  )
  return chosen, (
    f"--threshold={value}: {chosen:.4f}, which answers {coverage:.1%} of the "
    f"validation images at a precision of at least {precision:.0%}"
  )
