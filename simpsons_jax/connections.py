"""Bounds on the HTTP connections of `--mode=serve`: nothing waits forever.

uvicorn closes idle keep-alive connections, but not one whose request headers
never finish: a client that opens connections and sends half a header
(slowloris) would hold them, and with them file descriptors, until the
process runs out and nobody else, `/health` included, is answered. The
protocol `bounded_protocol` gives uvicorn drops a connection whose headers
are not complete `header_timeout` seconds after it opened (or after its
request began), and keeps at most `max_connections` open: past it, a new
connection closes the oldest one still waiting for its headers (or, when
every connection is busy with a request, is itself closed at once).
"""

from __future__ import annotations

import asyncio
from typing import Any

from absl import logging

HEADER_TIMEOUT = 10.0  # Seconds for a request's headers, from its first byte.


def max_connections() -> int:
  """Connections kept open: half the process's file descriptors (the rest
  for the model's files, logs and libraries), at most 1024."""
  try:
    import resource
  except ImportError:  # Windows: no such limit to read.
    return 512
  soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
  return max(8, min(1024, soft // 2))


def bounded_protocol(header_timeout: float, max_open: int) -> type[asyncio.Protocol]:
  """uvicorn's httptools protocol with the bounds of the module docstring;
  one class per server (it holds the server's waiting connections)."""
  from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

  # Connections whose headers are not complete yet, oldest first.
  waiting: dict[Any, asyncio.TimerHandle] = {}

  class BoundedHttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
      super().connection_made(transport)
      if len(self.connections) > max_open:
        if not waiting:
          logging.warning("%d connections open: a new one was refused.", max_open)
          transport.close()
          return
        oldest = next(iter(waiting))
        logging.warning(
          "%d connections open: dropped the oldest one still sending its headers.",
          max_open,
        )
        oldest.drop()
      self._await_headers()

    def _await_headers(self) -> None:
      waiting[self] = self.loop.call_later(header_timeout, self._too_slow)

    def on_message_begin(self) -> None:
      super().on_message_begin()
      if self not in waiting:  # The next request of a kept-alive connection.
        self._await_headers()

    def on_headers_complete(self) -> None:
      self._headers_done()
      super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
      self._headers_done()
      super().connection_lost(exc)

    def _headers_done(self) -> None:
      timer = waiting.pop(self, None)
      if timer is not None:
        timer.cancel()

    def _too_slow(self) -> None:
      logging.info(
        "Dropped a connection whose headers took over %g s (%s).",
        header_timeout,
        self.client,
      )
      self.drop()

    def drop(self) -> None:
      """Closes the connection, whatever it was doing."""
      self._headers_done()
      if not self.transport.is_closing():
        self.transport.close()

  return BoundedHttpProtocol
