"""The process a mode runs in: JAX's multi-process runtime (its flags are
here), TensorFlow kept off the accelerators, and Orbax's log lines trimmed.
main.py calls `start` once, after `host_memory.keep_freed_memory`."""

from __future__ import annotations

import logging as logging_lib
import os

from absl import flags, logging

flags.DEFINE_string(
  "coordinator_address",
  os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
  "Multi-process: host:port of process 0 (or $JAX_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer(
  "num_processes",
  int(os.environ.get("JAX_NUM_PROCESSES", "1")),
  "Multi-process: how many processes (or $JAX_NUM_PROCESSES).",
)
flags.DEFINE_integer(
  "process_id",
  int(os.environ.get("JAX_PROCESS_ID", "0")),
  "Multi-process: this process's index (or $JAX_PROCESS_ID).",
)
flags.DEFINE_bool(
  "distributed",
  False,
  "Start JAX's multi-process runtime with the cluster's own settings (Cloud "
  "TPU pods, SLURM); implied by --coordinator_address.",
)
FLAGS = flags.FLAGS


def start() -> None:
  """Starts JAX (multi-process with --coordinator_address or --distributed),
  hides the accelerators from TensorFlow, and quiets processes other than 0."""
  logging.get_absl_handler().addFilter(_quiet_orbax)
  import jax
  import tensorflow as tf

  if FLAGS.coordinator_address:
    jax.distributed.initialize(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
  elif FLAGS.distributed:
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
