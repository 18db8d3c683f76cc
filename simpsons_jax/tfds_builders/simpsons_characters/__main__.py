"""Builds the `simpsons_characters` TFDS dataset (what `tfds build` does).

  python -m simpsons_jax.tfds_builders.simpsons_characters \
      --manual_dir=~/data/the-simpsons-characters-dataset \
      --data_dir=~/tensorflow_datasets

`tfds build simpsons_jax/tfds_builders/simpsons_characters --manual_dir=...`
does the same where the TFDS command line works (in tensorflow-datasets
4.9.10 it needs apache-beam installed, even for builders that do not use it).
"""

import sys

import tensorflow_datasets as tfds
from absl import app, flags

from simpsons_jax import characters
from simpsons_jax.tfds_builders.simpsons_characters import Builder

_MANUAL_DIR = flags.DEFINE_string(
  "manual_dir",
  None,
  "The unpacked Kaggle archive, or a folder of <character>/.",
  required=True,
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "Where TFDS data sets live (default: ~/tensorflow_datasets)."
)


def main(argv: list[str]) -> None:
  del argv
  try:  # Before the builder makes any folder.
    characters.resolve_data_dir(_MANUAL_DIR.value, "--manual_dir")
  except characters.DatasetError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None
  builder = Builder(data_dir=_DATA_DIR.value)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=_MANUAL_DIR.value)
  )
  print(builder.info)


if __name__ == "__main__":
  app.run(main)
