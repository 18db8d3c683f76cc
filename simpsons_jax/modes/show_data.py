"""--mode=show_data: random training frames with their characters."""

from __future__ import annotations

import ml_collections
from etils import epath


def run(
  workdir: epath.Path, paths: list[str], config: ml_collections.ConfigDict | None
) -> None:
  """Draws the grid and prints where it went."""
  del paths, config
  from simpsons_jax import evaluate

  print(evaluate.show_data(workdir))
