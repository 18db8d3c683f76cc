"""The process a mode runs in: JAX's multi-process runtime, TensorFlow kept off
the accelerators, and Orbax's log lines trimmed. main.py calls `start` once,
after `host_memory.keep_freed_memory`."""

from __future__ import annotations

import logging as logging_lib

from absl import logging


def start(
  coordinator_address: str = "",
  num_processes: int = 1,
  process_id: int = 0,
  distributed: bool = False,
) -> None:
  """Starts JAX (multi-process with `coordinator_address` or `distributed`),
  hides the accelerators from TensorFlow, and quiets processes other than 0."""
  logging.get_absl_handler().addFilter(_quiet_orbax)
  import jax
  import tensorflow as tf

  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif distributed:
    jax.distributed.initialize()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # Process 0 reports progress.
  # tf.data only feeds the host; keep TensorFlow off the accelerators.
  tf.config.set_visible_devices([], "GPU")


def _quiet_orbax(record: logging_lib.LogRecord) -> bool:
  """Drops Orbax's per-save INFO lines and the tracebacks of its background
  save threads (a failed save stops the run with one sentence naming the
  cause: checkpointing.SaveFailed); its other warnings and errors still show."""
  if "/orbax/" not in record.pathname:
    return True
  return record.levelno >= logging_lib.WARNING and not record.exc_info
