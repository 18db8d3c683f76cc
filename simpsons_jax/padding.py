"""Batches filled up with zero rows to a size that is compiled once: the
project's one padding (evaluation batches, prediction in fixed batches, the
server's batches and the maps)."""

from __future__ import annotations

import numpy as np


def pad(array: np.ndarray, rows: int | None = None) -> np.ndarray:
  """`array` with zero rows added along its first axis up to `rows` (default:
  the next power of two, so that few batch shapes are ever compiled)."""
  if rows is None:
    rows = 1 << (len(array) - 1).bit_length()
  if rows == len(array):
    return array
  out = np.zeros((rows, *array.shape[1:]), array.dtype)
  out[: len(array)] = array
  return out
