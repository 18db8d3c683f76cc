"""What a training run says as it goes: its log lines, TensorBoard scalars
and images, CLU's progress and profile actions, and the stop when a loss is
no longer finite."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from simpsons_jax import errors, metrics


def periodic_actions_of(
  config: ml_collections.ConfigDict,
  workdir: epath.Path,
  writer: metric_writers.MetricWriter,
  total_steps: int,
  start_step: int,
) -> list[periodic_actions.PeriodicAction]:
  """CLU's progress report (steps/s, ETA), and the profiler if asked for."""
  actions: list[periodic_actions.PeriodicAction] = [
    periodic_actions.ReportProgress(
      num_train_steps=total_steps,
      writer=writer,
      every_steps=config.train.log_every_steps,
    )
  ]
  if config.train.profile_steps and jax.process_index() == 0:
    actions.append(
      periodic_actions.Profile(
        logdir=str(workdir / "tensorboard"),
        num_profile_steps=config.train.profile_steps,
        profile_duration_ms=None,
        first_profile=start_step + 2,  # The first step compiles.
        every_secs=None,
      )
    )
  return actions


def check_finite(values: Mapping[str, float], what: str, step: int, manager) -> None:
  """UserError when the loss is NaN or infinite: the run stops, its last good
  checkpoint (kept by `manager`) named."""
  if not np.isfinite(values["loss"]):
    raise errors.UserError(
      f"{what} loss is {values['loss']} at step {step}: training stopped. The "
      f"last good checkpoint (step {manager.latest_step()}) is kept in "
      f"{manager.directory}; lower --config.optim.learning_rate and resume, or use "
      "--config.restart=True."
    )


class Window:
  """The training steps since the last report: their metric sums, added on
  the device (no step waits for the host), and how long they took."""

  def __init__(self):
    self._reset()

  def _reset(self) -> None:
    self.totals: Any = None
    self.steps, self.start = 0, time.perf_counter()

  def add(self, sums: Mapping[str, Any]) -> None:
    """Adds one step's sums."""
    if self.totals is None:
      self.totals = sums
    else:
      self.totals = jax.tree.map(jnp.add, self.totals, sums)
    self.steps += 1

  def report(
    self,
    writer: metric_writers.MetricWriter,
    step: int,
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    manager,
  ) -> None:
    """Reports the window (`training`) and starts the next one."""
    rate = self.steps * config.train.batch_size / (time.perf_counter() - self.start)
    training(writer, step, self.totals, rate, config, steps_per_epoch, manager)
    self._reset()


def training(
  writer: metric_writers.MetricWriter,
  step: int,
  totals: Any,
  rate: float,
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  manager,
) -> None:
  """The training metrics since the last report: checked, logged, written."""
  train_metrics = metrics.summarize(jax.device_get(totals))
  check_finite(train_metrics, "Training", step, manager)
  writer.write_scalars(step, {f"train_{k}": v for k, v in train_metrics.items()})
  writer.write_scalars(step, {"train_images_per_second": rate})
  logging.info(
    "epoch %d/%d step %d/%d: loss %.4f, accuracy %.4f, %.0f images/s",
    (step - 1) // steps_per_epoch + 1,
    config.train.num_epochs,
    step,
    steps_per_epoch * config.train.num_epochs,
    train_metrics["loss"],
    train_metrics["accuracy"],
    rate,
  )


def validation(
  writer: metric_writers.MetricWriter,
  step: int,
  val_metrics: Mapping[str, float],
  steps_per_epoch: int,
  manager,
) -> None:
  """Validation metrics: checked, written, logged."""
  check_finite(val_metrics, "Validation", step, manager)
  writer.write_scalars(step, {f"val_{k}": v for k, v in val_metrics.items()})
  writer.flush()
  logging.info(
    "epoch %.4g validation: %s",
    step / steps_per_epoch,
    ", ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()),
  )


def evaluation(name: str, step: int, figures: Mapping[str, float], size: str) -> None:
  """An extra evaluator's figures, logged (`size`: what it scored)."""
  logging.info(
    "%s at step %d: %s%s",
    name,
    step,
    ", ".join(f"{k} {v:.4f}" for k, v in figures.items()),
    f" on {size}" if size else "",
  )


def finished(
  step: int,
  val_metrics: Mapping[str, float],
  config: ml_collections.ConfigDict,
  manager,
) -> None:
  """The closing line: the last validation accuracy and the best checkpoint."""
  logging.info(
    "Finished at step %d: validation accuracy %.4f; best checkpoint by %s: "
    "step %s in %s.",
    *(step, val_metrics["accuracy"], config.ckpt.metric),
    *(manager.best_step(), manager.directory),
  )


def with_first_batch_shown(
  batches: Iterable[Any], writer: metric_writers.MetricWriter, start_step: int
) -> Iterator[Any]:
  """Passes batches through, writing a grid of the first one to TensorBoard."""
  for i, batch in enumerate(batches):
    if i == 0 and start_step == 0:
      writer.write_images(0, {"train_inputs": batch["image"]})
    yield batch
