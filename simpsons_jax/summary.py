"""TensorBoard summaries, written by process 0 only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api


class SummaryWriter:
  """Scalars, images and hyperparameters for TensorBoard under `logdir`."""

  def __init__(self, logdir: str | os.PathLike):
    self._writer = None
    if jax.process_index() == 0:
      self._writer = tf.summary.create_file_writer(str(logdir))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in values.items():
        tf.summary.scalar(name, float(value), step=step)

  def images(self, step: int, name: str, images: np.ndarray, max_outputs: int = 16):
    """Writes uint8 images (N, H, W, 3)."""
    if self._writer is None:
      return
    with self._writer.as_default():
      tf.summary.image(name, images, step=step, max_outputs=max_outputs)

  def hparams(self, values: Mapping[str, Any]) -> None:
    """Writes the config; sequences become strings, as TensorBoard needs."""
    if self._writer is None:
      return
    flat = {
      key: value if isinstance(value, bool | int | float | str) else str(value)
      for key, value in values.items()
    }
    with self._writer.as_default():
      hparams_api.hparams(flat)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
