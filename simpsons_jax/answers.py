"""What classifying images gives: the classifier's type, and an image's answer
(its most probable characters, 'unknown' when the first of them is below the
threshold). One definition for predict, serve and video."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

UNKNOWN = "unknown"
# uint8 images (N, S, S, 3), any N -> probabilities (N, characters).
Classifier = Callable[[np.ndarray], np.ndarray]


def named(probability: float, name: str, threshold: float) -> str:
  """`name`, or 'unknown' when `probability` is below `threshold`."""
  return name if probability >= threshold else UNKNOWN


def answer(
  probabilities: np.ndarray, names: Sequence[str], top_k: int, threshold: float
) -> dict[str, Any]:
  """{"character", "top": [{"character", "probability"}]} for one image's
  probabilities (one per character, in `names`' order)."""
  order = np.argsort(-probabilities)[: min(top_k, len(names))]
  top = [{"character": names[i], "probability": float(probabilities[i])} for i in order]
  best = named(top[0]["probability"], top[0]["character"], threshold)
  return {"character": best, "top": top}


def padded_batch(batch: np.ndarray) -> np.ndarray:
  """`batch` with zeros added along its first axis up to a power of two:
  few batch shapes are ever compiled."""
  size = 1 << (len(batch) - 1).bit_length()
  out = np.zeros((size, *batch.shape[1:]), batch.dtype)
  out[: len(batch)] = batch
  return out
