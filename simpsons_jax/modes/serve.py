"""--mode=serve: a web page and a JSON API to try a trained model."""

from __future__ import annotations

import ml_collections
from absl import flags
from etils import epath

from simpsons_jax.modes import check_flag, finite_at_least

flags.DEFINE_string(
  "host", "127.0.0.1", "serve: the address to listen on (0.0.0.0: every interface)."
)
flags.DEFINE_integer(
  "port", 8000, "serve: the HTTP port (0: one the system picks, printed at start)."
)
check_flag("port", lambda port: 0 <= port <= 65535, "a port number from 0 to 65535")
flags.DEFINE_integer(
  "max_batch", 32, "serve: requests waiting together run as one batch of at most this."
)
check_flag("max_batch", lambda n: n >= 1, "a whole number of requests, at least 1")
flags.DEFINE_float(
  "batch_wait_ms",
  2.0,
  "serve: how long a batch waits for more requests after its first.",
)
check_flag("batch_wait_ms", finite_at_least(0), "milliseconds, 0 or more")
FLAGS = flags.FLAGS


def run(
  workdir: epath.Path, paths: list[str], config: ml_collections.ConfigDict | None
) -> None:
  """Serves `--checkpoint` (or an export folder) until interrupted."""
  del paths, config
  from simpsons_jax import serve

  serve.run(
    workdir,
    FLAGS.checkpoint,
    FLAGS.threshold,
    FLAGS.top_k,
    FLAGS.host,
    FLAGS.port,
    FLAGS.max_batch,
    FLAGS.batch_wait_ms / 1000,
  )
