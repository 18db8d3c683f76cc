"""Classification metrics from summed counts.

Steps return sums (loss, correct, count, a confusion matrix) rather than means,
so that batches of any size, padding included, add up exactly; the figures
are derived once from the totals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def summarize(totals: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Mean loss and accuracy; from a confusion matrix, macro-F1 and balanced accuracy.

  Macro figures average over the classes that have examples.
  """
  count = float(totals["count"])
  result = {
    "loss": float(totals["loss_sum"]) / count,
    "accuracy": float(totals["correct"]) / count,
  }
  if "top3_correct" in totals:
    result["top3_accuracy"] = float(totals["top3_correct"]) / count
  if "confusion" in totals:
    stats = per_class(totals["confusion"])
    present = stats["support"] > 0
    result["macro_f1"] = float(stats["f1"][present].mean())
    result["balanced_accuracy"] = float(stats["recall"][present].mean())
  return result


def per_class_report(
  confusion: np.ndarray, names: Sequence[str]
) -> dict[str, dict[str, float]]:
  """Per-character precision, recall, F1 and support, keyed by name."""
  stats = per_class(confusion)
  return {
    name: {key: float(values[i]) for key, values in stats.items()}
    for i, name in enumerate(names)
  }
