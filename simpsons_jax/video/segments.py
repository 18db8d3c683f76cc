"""From per-sample probabilities to who is on screen when: smoothing over
neighbouring samples, a label per sample, runs of one label as segments, and
screen time per character. Pure NumPy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simpsons_jax import answers


def smooth(probabilities: np.ndarray, window: int) -> np.ndarray:
  """Each row averaged with its neighbours: a centred window of `window` rows,
  shortened at the ends."""
  if window <= 1:
    return probabilities
  half = window // 2
  padded = np.cumsum(np.pad(probabilities, ((1, 0), (0, 0))), axis=0)
  n = len(probabilities)
  lo = np.clip(np.arange(n) - half, 0, n)
  hi = np.clip(np.arange(n) + window - half, 0, n)
  return (padded[hi] - padded[lo]) / (hi - lo)[:, None]


def labels(
  probabilities: np.ndarray,
  names: Sequence[str],
  threshold: float,
  scores: np.ndarray | None = None,
) -> list:
  """Each row's most probable character, or 'unknown' when its unknown score
  (default: its top probability) is below `threshold`."""
  best = probabilities.argmax(axis=1)
  if scores is None:
    scores = probabilities.max(axis=1)
  return [
    answers.named(score, names[i], threshold)
    for i, score in zip(best, scores, strict=True)
  ]


def segments(
  times: np.ndarray, sample_labels: Sequence[str], interval: float, end: float
) -> list[dict[str, Any]]:
  """Runs of one label as {character, start, end} seconds: a run ends where the
  next begins; the last ends at `end` (or one interval after its last sample)."""
  found = []
  for i, label in enumerate(sample_labels):
    if found and found[-1]["character"] == label:
      continue
    if found:
      found[-1]["end"] = float(times[i])
    found.append({"character": label, "start": float(times[i]), "end": None})
  if found:
    found[-1]["end"] = float(max(end, times[-1] + interval) if end else times[-1])
  return found


def screen_time(found: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Seconds on screen per character (unknown included), longest first."""
  total: dict[str, float] = {}
  for s in found:
    total[s["character"]] = total.get(s["character"], 0.0) + s["end"] - s["start"]
  return dict(sorted(total.items(), key=lambda kv: -kv[1]))
