"""The networks that name a character from an image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 ('VALID'), as `nn.max_pool` computes it.

  Written as a reshape and a max: the same values as `nn.max_pool`, but XLA's
  CPU backward pass for it is much faster than the one for `reduce_window`.
  """
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SimpsonsCNN(nn.Module):
  """The notebook's network: conv+ReLU+pool blocks, then dropout+dense layers.

  Inputs are uint8 images (N, H, W, 3); outputs one float32 logit per
  character. `dtype` is the compute type (bfloat16 on accelerators); the
  parameters stay float32.
  """

  num_classes: int
  conv_features: Sequence[int] = (8, 16, 32, 64)
  dense_features: Sequence[int] = (512, 512, 512, 512)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    glorot = nn.initializers.glorot_uniform()
    x = images.astype(self.dtype) / 255.0
    for i, features in enumerate(self.conv_features):
      x = nn.Conv(
        features,
        (3, 3),
        padding="SAME",
        kernel_init=glorot,
        dtype=self.dtype,
        name=f"conv{i}",
      )(x)
      x = max_pool_2x2(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    for i, features in enumerate(self.dense_features):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      dense = nn.Dense(features, kernel_init=glorot, dtype=self.dtype, name=f"dense{i}")
      x = nn.relu(dense(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(
      self.num_classes, kernel_init=glorot, dtype=self.dtype, name="logits"
    )(x)
    return logits.astype(jnp.float32)


def create(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the model named by `config.model` for `num_classes` characters."""
  if config.model == "simpsons_cnn":
    return SimpsonsCNN(
      num_classes=num_classes,
      conv_features=tuple(config.conv_features),
      dense_features=tuple(config.dense_features),
      dropout_rate=config.dropout_rate,
      dtype=jnp.dtype(config.dtype),
    )
  raise ValueError(f"Unknown --config.model={config.model!r}; known: simpsons_cnn.")


def count_params(params: Any) -> int:
  """The number of scalars in a parameter tree."""
  return sum(x.size for x in jax.tree.leaves(params))
