"""A network's outputs for evaluation and prediction: logits, with the
test-time flip (the mean of the probabilities of an image and its mirror),
and its penultimate features (what the final layer, the module named
`logits` in every registered model, reads), which the k-nearest-neighbour
unknown score compares (`open_set`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The name of every registered model's final Dense layer.
FINAL_LAYER = "logits"


def logits(
  apply_fn: Callable, variables: Any, images: jax.Array, flip: bool = False
) -> jax.Array:
  """Logits for evaluation; with `flip`, the log of the mean of the softmax
  probabilities of the images and their mirrors (test-time augmentation)."""
  return outputs(apply_fn, variables, images, flip)[0]


def _with_features(
  apply_fn: Callable, variables: Any, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The raw logits and the input of the final layer (flattened)."""
  captured = []

  def capture(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.name == FINAL_LAYER:
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    out = apply_fn(variables, images, train=False)
  features = captured[-1] if captured else out
  return out, features.reshape(features.shape[0], -1).astype(jnp.float32)


def outputs(
  apply_fn: Callable, variables: Any, images: jax.Array, flip: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`logits`; the network's raw logits (with `flip`, the mean of the
  image's and its mirror's), whose scale the energy and max-logit scores
  read; and the penultimate features, L2-normalised (with `flip`, of the
  mean of both)."""
  raw, features = _with_features(apply_fn, variables, images)
  if flip:
    mirrored, mirrored_features = _with_features(
      apply_fn, variables, jnp.flip(images, axis=2)
    )
    both = jnp.stack([jax.nn.log_softmax(raw), jax.nn.log_softmax(mirrored)])
    tta = jax.nn.logsumexp(both, axis=0) - jnp.log(2.0)
    raw, features = (raw + mirrored) / 2, (features + mirrored_features) / 2
  else:
    tta = raw
  norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
  return tta, raw, features / jnp.maximum(norm, 1e-12)
