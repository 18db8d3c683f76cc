"""What classifying images gives: the classifier's type, and an image's answer
(its most probable characters, 'unknown' when the first of them is below the
threshold). One definition for predict, serve and video."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  from simpsons_jax import open_set

UNKNOWN = "unknown"
# `--threshold`'s value for a run's own unknown score and threshold.
AUTO = "auto"
# uint8 images (N, S, S, 3), any N -> calibrated probabilities (N,
# characters) and the unknown score (N,) that the threshold is compared with.
Classifier = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class UnknownRule:
  """When an image is 'unknown': its `score` (`open_set.SCORES`) is below
  `threshold`; `bank`, the training features the knn score compares and its k."""

  score: str
  threshold: float
  bank: open_set.Bank | None = None


def named(probability: float, name: str, threshold: float) -> str:
  """`name`, or 'unknown' when `probability` is below `threshold`."""
  return name if probability >= threshold else UNKNOWN


def caption(
  probabilities: np.ndarray,
  names: Sequence[str],
  threshold: float,
  score: float | None = None,
) -> str:
  """An image's answer as drawn on a frame: 'homer_simpson 0.93', or
  'unknown (homer_simpson 0.41)' when its unknown `score` (default: the top
  probability) is below `threshold` (`named`)."""
  best = int(np.argmax(probabilities))
  text = f"{names[best]} {probabilities[best]:.2f}"
  compared = probabilities[best] if score is None else score
  if named(compared, names[best], threshold) == UNKNOWN:
    return f"{UNKNOWN} ({text})"
  return text


def answer(
  probabilities: np.ndarray,
  names: Sequence[str],
  top_k: int,
  threshold: float,
  score: float | None = None,
) -> dict[str, Any]:
  """{"character", "top": [{"character", "probability"}]} for one image's
  probabilities (one per character, in `names`' order); 'unknown' when its
  unknown `score` (default: its top probability) is below `threshold`."""
  order = np.argsort(-probabilities)[: min(top_k, len(names))]
  top = [{"character": names[i], "probability": float(probabilities[i])} for i in order]
  compared = top[0]["probability"] if score is None else float(score)
  best = top[0]["character"] if compared >= threshold else UNKNOWN
  return {"character": best, "top": top}
