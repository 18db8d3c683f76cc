"""Work from many threads gathered into batches, and a budget of what may be
in flight at once: generic parts of `serve`."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from simpsons_jax import errors


class Batcher:
  """Runs the items of requests that wait together as one batch.

  `submit` queues one item and returns a future of its result. One worker
  thread takes the first item waiting, gathers more for at most `wait` seconds
  (at most `max_batch` in all), and hands them at once to `run`, which returns
  one result or exception per item. With `max_batch` 1, items run one at a time.
  """

  def __init__(
    self,
    run: Callable[[list[Any]], list[Any]],
    max_batch: int = 32,
    wait: float = 0.002,
  ):
    if max_batch < 1:
      raise errors.UserError(f"--max_batch must be at least 1, not {max_batch}")
    self._run, self._max_batch, self._wait = run, max_batch, wait
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=self._work, name="batcher", daemon=True).start()

  def submit(self, item: Any) -> concurrent.futures.Future:
    """Queues one item: a future of its result."""
    done: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((item, done))
    return done

  def _work(self) -> None:
    while True:
      waiting = [self._queue.get()]
      deadline = time.monotonic() + self._wait
      while len(waiting) < self._max_batch:
        try:
          waiting.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
          break
      try:
        results = self._run([item for item, _ in waiting])
      except Exception as e:  # noqa: BLE001 - handed to every waiting request.
        results = [e] * len(waiting)
      for (_, done), result in zip(waiting, results, strict=True):
        if isinstance(result, Exception):
          done.set_exception(result)
        else:
          done.set_result(result)


class PixelBudget:
  """The pixels all requests may be decoding at once: a request waits for its
  image's share (read from the header) for at most `timeout` seconds."""

  def __init__(self, pixels: int, timeout: float):
    self.total, self._free, self._timeout = pixels, pixels, timeout
    self._changed = threading.Condition()

  def take(self, pixels: int) -> bool:
    """Takes `pixels` of the budget (an image larger than all of it takes all
    of it: it decodes alone); False if they did not free up in time."""
    pixels = min(pixels, self.total)
    with self._changed:
      if not self._changed.wait_for(lambda: self._free >= pixels, self._timeout):
        return False
      self._free -= pixels
      return True

  def give_back(self, pixels: int) -> None:
    with self._changed:
      self._free += min(pixels, self.total)
      self._changed.notify_all()
