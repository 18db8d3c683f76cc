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


def caption(probabilities: np.ndarray, names: Sequence[str], threshold: float) -> str:
  """An image's answer as drawn on a frame: 'homer_simpson 0.93', or
  'unknown (homer_simpson 0.41)' below `threshold` (`named`)."""
  best = int(np.argmax(probabilities))
  text = f"{names[best]} {probabilities[best]:.2f}"
  if named(probabilities[best], names[best], threshold) == UNKNOWN:
    return f"{UNKNOWN} ({text})"
  return text


def answer(
  probabilities: np.ndarray, names: Sequence[str], top_k: int, threshold: float
) -> dict[str, Any]:
  """{"character", "top": [{"character", "probability"}]} for one image's
  probabilities (one per character, in `names`' order)."""
  order = np.argsort(-probabilities)[: min(top_k, len(names))]
  top = [{"character": names[i], "probability": float(probabilities[i])} for i in order]
  best = named(top[0]["probability"], top[0]["character"], threshold)
  return {"character": best, "top": top}
