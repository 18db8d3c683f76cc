"""Data sources: where a run's images come from (see `core.DataSource`).

`--config.data.source` names one: `folder` (the Kaggle layout in
`config.data.dir`), `synthetic` (the demo) or `tfds:NAME[:VERSION]`. A new
source is one `core.DataSource` class and one line in `SOURCES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_collections

from simpsons_jax import errors, importing

if TYPE_CHECKING:
  from simpsons_jax.data import core

# Imported when used: TFDS loads only for tfds: runs.
SOURCES: dict[str, str] = {
  "folder": "simpsons_jax.data.folder:FolderSource",
  "synthetic": "simpsons_jax.data.folder:SyntheticSource",
  "tfds": "simpsons_jax.data.tfds:TfdsSource",
}


def source_name(dataset: str) -> str:
  """The source named by a `config.data.source` value ('tfds:x' -> 'tfds')."""
  return dataset.partition(":")[0]


def create(config: ml_collections.ConfigDict) -> core.DataSource:
  """The data source `config.data.source` names."""
  name, _, spec = config.data.source.partition(":")
  if name not in SOURCES:
    raise errors.UserError(
      f"Unknown --config.data.source={config.data.source!r}; use one of "
      f"{', '.join(SOURCES)} (tfds as tfds:NAME[:VERSION])."
    )
  return importing.load(SOURCES[name])(config, spec)


__all__ = ["SOURCES", "core", "create", "source_name"]
