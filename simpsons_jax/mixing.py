"""Mixup and CutMix of a training batch, inside the jitted train step.

Each example is mixed with its mirror in the batch (example i with n-1-i), by
one ratio `lam ~ Beta(alpha, alpha)` per batch; the loss is then
`lam * loss(label) + (1 - lam) * loss(partner's label)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("none", "mixup", "cutmix")


def partners(values: jax.Array) -> jax.Array:
  """What each example is mixed with: the batch reversed."""
  return jnp.flip(values, axis=0)


def mix(
  rng: jax.Array, images: jax.Array, kind: str, alpha: float
) -> tuple[jax.Array, jax.Array]:
  """`(mixed images, lam)`: the share `lam` of each mixed image that is its own.

  mixup blends whole images (float32, still on the 0..255 scale); cutmix
  pastes one box of the partner, `lam` = the share of pixels outside the box.
  """
  lam_rng, y_rng, x_rng = jax.random.split(rng, 3)
  lam = jax.random.beta(lam_rng, alpha, alpha)
  if kind == "mixup":
    mixed = lam * images.astype(jnp.float32)
    return mixed + (1 - lam) * partners(images).astype(jnp.float32), lam
  if kind != "cutmix":
    raise ValueError(f"Unknown mix kind {kind!r}; use mixup or cutmix.")
  height, width = images.shape[1:3]
  ratio = jnp.sqrt(1 - lam)
  centre_y = jax.random.randint(y_rng, (), 0, height)
  centre_x = jax.random.randint(x_rng, (), 0, width)
  half_h = jnp.round(height * ratio / 2).astype(jnp.int32)
  half_w = jnp.round(width * ratio / 2).astype(jnp.int32)
  rows = jnp.arange(height)
  cols = jnp.arange(width)
  in_rows = (rows >= centre_y - half_h) & (rows < centre_y + half_h)
  in_cols = (cols >= centre_x - half_w) & (cols < centre_x + half_w)
  box = in_rows[:, None] & in_cols[None, :]
  mixed = jnp.where(box[None, :, :, None], partners(images), images)
  return mixed, 1 - box.mean()
