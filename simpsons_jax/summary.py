"""TensorBoard summaries through CLU's metric writers, by process 0 only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
from clu import metric_writers


def create_writer(logdir: str | os.PathLike) -> metric_writers.MetricWriter:
  """An asynchronous TensorBoard writer on process 0; one that drops
  everything on the other processes."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(logdir)))


def hparams(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
  """A config's top-level values as TensorBoard hparams (sequences as text)."""
  return {
    key: value if isinstance(value, bool | int | float | str) else str(value)
    for key, value in config.items()
    if not isinstance(value, Mapping)
  }
