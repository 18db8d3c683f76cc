"""--mode=evaluate: a checkpoint's report and figures on a data set."""

from __future__ import annotations

import ml_collections
from absl import flags
from etils import epath

flags.DEFINE_string(
  "eval_dir",
  "",
  "evaluate: a folder in the Kaggle training layout (<character>/*.jpg) or "
  "test-set layout (<character>_<N>.jpg), a split of a prepared TFDS data set "
  "(tfds:NAME[:VERSION]/SPLIT, in TFDS_DATA_DIR) or the name of one of the "
  "run's config.evals; default: the run's validation split.",
)
flags.DEFINE_string(
  "unknown_dir",
  "",
  "evaluate: a folder (either Kaggle layout) of characters the run did not "
  "train on (e.g. its data folder with --config.data.hold_out): how well the "
  "model tells them apart (AUROC) and answers them 'unknown'.",
)
FLAGS = flags.FLAGS


def run(
  workdir: epath.Path, paths: list[str], config: ml_collections.ConfigDict | None
) -> None:
  """Evaluates `--checkpoint` on `--eval_dir` (default: the validation split)."""
  del paths, config
  from simpsons_jax import evaluate

  evaluate.run(
    workdir,
    FLAGS.eval_dir,
    FLAGS.checkpoint,
    output_dir=FLAGS.output_dir,
    unknown_dir=FLAGS.unknown_dir,
    coverage=FLAGS.coverage,
  )
