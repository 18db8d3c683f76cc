"""A network's outputs for evaluation and prediction: logits, with the
test-time flip (the mean of the probabilities of an image and its mirror)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def logits(
  apply_fn: Callable, variables: Any, images: jax.Array, flip: bool = False
) -> jax.Array:
  """Logits for evaluation; with `flip`, the log of the mean of the softmax
  probabilities of the images and their mirrors (test-time augmentation)."""
  return outputs(apply_fn, variables, images, flip)[0]


def outputs(
  apply_fn: Callable, variables: Any, images: jax.Array, flip: bool = False
) -> tuple[jax.Array, jax.Array]:
  """`logits`, and the network's raw logits (with `flip`, the mean
  of the image's and its mirror's), whose scale the energy score reads."""
  logits = apply_fn(variables, images, train=False)
  if not flip:
    return logits, logits
  mirrored = apply_fn(variables, jnp.flip(images, axis=2), train=False)
  both = jnp.stack([jax.nn.log_softmax(logits), jax.nn.log_softmax(mirrored)])
  return jax.nn.logsumexp(both, axis=0) - jnp.log(2.0), (logits + mirrored) / 2
