"""--mode=export: a checkpoint as files that run without this code."""

from __future__ import annotations

import ml_collections
from absl import flags
from etils import epath

flags.DEFINE_list(
  "formats",
  ["jax", "savedmodel", "tflite"],
  "export: jax (model.jax, jax.export), savedmodel (TensorFlow SavedModel), "
  "tflite (model.tflite, converted from the SavedModel).",
)
FLAGS = flags.FLAGS


def run(
  workdir: epath.Path, paths: list[str], config: ml_collections.ConfigDict | None
) -> None:
  """Exports `--checkpoint` in `--formats`."""
  del paths, config
  from simpsons_jax import export

  written = export.run(
    workdir, FLAGS.checkpoint, FLAGS.formats, FLAGS.top_k, FLAGS.output_dir
  )
  print(f"Exported {', '.join(written.formats)} to {written.folder}")
