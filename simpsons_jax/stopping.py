"""Stopping a training run on request: SIGINT (Ctrl-C, Colab's interrupt)
or SIGTERM (a scheduler) ends the current step, a checkpoint is saved and the
run exits saying how to resume; a second signal quits at once."""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging
from etils import epath


class Interrupted(Exception):
  """Training stopped on SIGINT or SIGTERM after saving a checkpoint."""

  def __init__(self, signum: int, step: int, directory: epath.Path):
    self.signum, self.step = signum, step
    super().__init__(
      f"{signal.Signals(signum).name} received: stopped at step {step} with a "
      f"checkpoint in {directory}. Run the same command to resume."
    )


class StopSignals:
  """Within the block, SIGINT and SIGTERM become a request to stop at the
  next step (`received`: the signal, or None). A second signal stops at once,
  as Python's default handler would. Only the main thread can take signals;
  elsewhere nothing changes."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    if self.received is not None:
      raise KeyboardInterrupt
    self.received = signum
    logging.warning(
      "%s received: saving a checkpoint after this step (send it again to quit "
      "at once).",
      signal.Signals(signum).name,
    )

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
