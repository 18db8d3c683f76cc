"""--mode=serve: a web page and a JSON API to try a trained model."""

from __future__ import annotations

import ml_collections
from absl import flags
from etils import epath

flags.DEFINE_string(
  "host", "127.0.0.1", "serve: the address to listen on (0.0.0.0: every interface)."
)
flags.DEFINE_integer("port", 8000, "serve: the HTTP port.")
flags.DEFINE_integer(
  "max_batch", 32, "serve: requests waiting together run as one batch of at most this."
)
flags.DEFINE_float(
  "batch_wait_ms",
  2.0,
  "serve: how long a batch waits for more requests after its first.",
)
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
