"""The `simpsons_characters` TFDS dataset."""

from simpsons_jax.tfds_builders.simpsons_characters.simpsons_characters_dataset_builder import (  # noqa: E501
  Builder,
)

__all__ = ["Builder"]
