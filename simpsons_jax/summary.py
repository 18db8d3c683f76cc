"""TensorBoard summaries through CLU's metric writers, by process 0 only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from clu import metric_writers


def create_writer(logdir: str | os.PathLike) -> metric_writers.MetricWriter:
  """An asynchronous TensorBoard writer on process 0; one that drops
  everything on the other processes."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(logdir)))


def hparams(config: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
  """A config's values as TensorBoard hparams, nested groups (a ConfigDict or
  a Mapping) flattened to dotted keys ('train.num_epochs'), sequences and
  other values as text."""
  found: dict[str, bool | int | float | str] = {}
  for key, value in config.items():
    if isinstance(value, Mapping | ml_collections.ConfigDict):
      found.update(hparams(value, f"{prefix}{key}."))
    elif isinstance(value, bool | int | float | str):
      found[prefix + key] = value
    else:
      found[prefix + key] = str(value)
  return found
