"""--mode=train: train a run, or resume it (the default mode)."""

from __future__ import annotations

import ml_collections
from absl import app, logging
from etils import epath


def run(
  workdir: epath.Path, paths: list[str], config: ml_collections.ConfigDict | None
) -> None:
  """Trains `config` in `workdir`, resuming what is there."""
  del paths
  from simpsons_jax import stopping, train

  if config is None:
    raise app.UsageError("--config is required to train, e.g. configs/demo.py.")
  logging.info("Config:\n%s", config)
  try:
    train.train_and_evaluate(config, workdir)
  except stopping.Interrupted as stop:
    logging.warning("%s", stop)
    raise SystemExit(128 + stop.signum) from None
