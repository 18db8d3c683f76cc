"""Classification metrics from summed counts.

Steps return sums (loss, correct, count, a confusion matrix) rather than means,
so that batches of any size, padding included, add up exactly; the figures
are derived once from the totals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def add(totals: Mapping[str, Any] | None, sums: Mapping[str, Any]) -> dict[str, Any]:
  """Adds one step's sums to the running totals (on the host)."""
  sums = jax.device_get(dict(sums))
  if totals is None:
    return {key: np.asarray(value, np.float64) for key, value in sums.items()}
  return {
    key: totals[key] + np.asarray(value, np.float64) for key, value in sums.items()
  }


def per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Precision, recall, F1 and support per class; rows are true classes."""
  confusion = np.asarray(confusion, np.float64)
  true_positive = np.diag(confusion)
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  precision = np.divide(
    true_positive, predicted, out=np.zeros_like(predicted), where=predicted > 0
  )
  recall = np.divide(
    true_positive, support, out=np.zeros_like(support), where=support > 0
  )
  denominator = precision + recall
  f1 = np.divide(
    2 * precision * recall,
    denominator,
    out=np.zeros_like(denominator),
    where=denominator > 0,
  )
  return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def _macro(statistic: str) -> Callable[[Mapping[str, np.ndarray]], float]:
  """The mean of a per-class statistic over the classes that have examples."""

  def macro(totals: Mapping[str, np.ndarray]) -> float:
    stats = per_class(totals["confusion"])
    return float(stats[statistic][stats["support"] > 0].mean())

  return macro


# Every figure of a report: its name, the sums it is computed from (the scorer's:
# loss_sum, correct, top3_correct, count, confusion) and how. A new metric is
# one line here.
METRICS: tuple[tuple[str, tuple[str, ...], Callable[..., float]], ...] = (
  ("loss", ("loss_sum",), lambda t: float(t["loss_sum"]) / float(t["count"])),
  # Of the characters' images: negatives (the train step's) are never right.
  (
    "accuracy",
    ("correct",),
    lambda t: float(t["correct"]) / float(t["count"] - t.get("negatives", 0)),
  ),
  (
    "top3_accuracy",
    ("top3_correct",),
    lambda t: float(t["top3_correct"]) / float(t["count"]),
  ),
  ("macro_f1", ("confusion",), _macro("f1")),
  ("balanced_accuracy", ("confusion",), _macro("recall")),
)


def summarize(totals: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Each of METRICS whose sums `totals` holds, from the totals."""
  return {
    name: fn(totals)
    for name, needs, fn in METRICS
    if all(key in totals for key in needs)
  }


def per_class_report(
  confusion: np.ndarray, names: Sequence[str]
) -> dict[str, dict[str, float]]:
  """Per-character precision, recall, F1 and support, keyed by name."""
  stats = per_class(confusion)
  return {
    name: {key: float(values[i]) for key, values in stats.items()}
    for i, name in enumerate(names)
  }
