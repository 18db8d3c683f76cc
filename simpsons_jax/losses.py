"""The training objective: softmax cross-entropy, label-smoothed and
class-weighted as the config says, and for negatives (label -1, images of
characters the model must not name) the cross-entropy with the uniform
distribution (outlier exposure, Hendrycks et al. 2019; the entropic open-set
loss of Dhamija et al. 2018 up to a constant): no extra class, their answer
pushed towards "none of these"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simpsons_jax import errors


def class_weights(labels: np.ndarray, num_classes: int, kind: str) -> np.ndarray | None:
  """Loss weight per character: None, or n / (K * n_c) for 'balanced'.

  Balanced weights make every character count as much in the loss as if
  all had the same number of training images; their mean over images is 1.
  """
  if kind == "none":
    return None
  labels = labels[labels >= 0]  # Negatives carry no character's weight.
  if kind == "balanced":
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.divide(
      len(labels), num_classes * counts, out=np.zeros_like(counts), where=counts > 0
    )
    return weights.astype(np.float32)
  raise errors.UserError(
    f"Unknown --config.train.class_weights={kind!r}; use none or balanced."
  )


def cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  label_smoothing: float = 0.0,
  weights: jax.Array | None = None,
) -> jax.Array:
  """Each example's softmax cross-entropy against its label (smoothed by
  `label_smoothing`), times its character's weight (`class_weights`)."""
  if label_smoothing:
    targets = optax.smooth_labels(
      jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing
    )
    losses = optax.softmax_cross_entropy(logits, targets)
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return losses if weights is None else losses * weights[labels]


def uniform_cross_entropy(logits: jax.Array) -> jax.Array:
  """Each example's cross-entropy with the uniform distribution over the
  characters: -mean_k log softmax(z)_k = logsumexp(z) - mean(z), at least
  log K, reached when every character is as likely."""
  return jax.nn.logsumexp(logits, axis=-1) - logits.mean(axis=-1)


def objective(
  logits: jax.Array,
  labels: jax.Array,
  label_smoothing: float = 0.0,
  weights: jax.Array | None = None,
  negatives_weight: float = 0.0,
) -> jax.Array:
  """Each example's loss: `cross_entropy` for a character (label >= 0),
  `negatives_weight` x `uniform_cross_entropy` for a negative (label -1)."""
  known = labels >= 0
  losses = cross_entropy(logits, jnp.where(known, labels, 0), label_smoothing, weights)
  return jnp.where(known, losses, negatives_weight * uniform_cross_entropy(logits))
