"""Where the network looked: Grad-CAM and input-gradient maps.

Grad-CAM (Selvaraju et al. 2017) weighs the feature maps of the network's last
spatial layer by the mean gradient of the answer's logit over each map, and
keeps the positive sum: a coarse map of what raised that answer, resized to the
image. The input gradient is the size of that logit's gradient at each pixel.
Any registered model works unchanged: the last module call whose output is a
(N, H, W, C) array is the feature layer, found and perturbed through Flax's
method interception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

from simpsons_jax import models, padding


def _feature_calls(apply: Callable, variables: Any, images: jax.Array) -> list[tuple]:
  """The shapes of every 4-D module output, in the order the calls end."""
  shapes = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and getattr(out, "ndim", 0) == 4:
      shapes.append(tuple(out.shape))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: apply(v, x, train=False), variables, images)
  return shapes


def feature_layer(
  apply: Callable, variables: Any, images: jax.Array
) -> tuple[int, tuple]:
  """The index (among 4-D module outputs) and shape of the last one with a
  spatial extent: the layer Grad-CAM reads."""
  shapes = _feature_calls(apply, variables, images)
  spatial = [i for i, s in enumerate(shapes) if s[1] > 1 or s[2] > 1]
  if not spatial:
    raise ValueError("The model has no layer with a spatial map for Grad-CAM.")
  return spatial[-1], shapes[spatial[-1]]


def _logits_and_features(
  apply: Callable, variables: Any, images: jax.Array, layer: int, delta: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The logits with `delta` added to the `layer`-th 4-D module output, and
  that output."""
  count, captured = [0], []

  def perturb(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and getattr(out, "ndim", 0) == 4:
      if count[0] == layer:
        captured.append(out)
        out = out + delta
      count[0] += 1
    return out

  with nn.intercept_methods(perturb):
    logits = apply(variables, images, train=False)
  return logits, captured[0]


def maps(
  apply: Callable, variables: Any, images: jax.Array, targets: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Grad-CAM and input-gradient maps (N, S, S), each scaled to [0, 1] per
  image, for the characters `targets` (default: the answers), of uint8
  images (N, S, S, 3); and the `targets`. Traceable: `jitted` compiles it."""
  pixels = jnp.asarray(images, jnp.float32)
  layer, shape = feature_layer(apply, variables, pixels)
  if targets is None:
    targets = apply(variables, pixels, train=False).argmax(-1)
  chosen = jnp.asarray(targets)

  def score(delta, x):
    logits, features = _logits_and_features(apply, variables, x, layer, delta)
    return jnp.take_along_axis(logits, chosen[:, None], axis=1).sum(), features

  (feature_grads, pixel_grads), features = jax.grad(
    score, argnums=(0, 1), has_aux=True
  )(jnp.zeros(shape, jnp.float32), pixels)
  weights = feature_grads.mean(axis=(1, 2), keepdims=True)
  cam = jax.nn.relu((weights * features).sum(-1))
  cam = jax.image.resize(cam, pixels.shape[:3], "bilinear")
  saliency = jnp.abs(pixel_grads).max(-1)
  return {"grad_cam": _unit(cam), "input_gradient": _unit(saliency), "targets": chosen}


# maps(apply, variables, images, targets), compiled once per model and shape.
jitted = jax.jit(maps, static_argnums=0)

Explainer = Callable[[np.ndarray, np.ndarray | None], dict[str, np.ndarray]]


def explainer(
  config: ml_collections.ConfigDict, num_classes: int, variables: Any
) -> Explainer:
  """`maps` of a trained model, compiled: (uint8 images, targets or None for
  the answers) -> numpy maps. The model is built with XLA's convolutions,
  whose gradients reach the pixels."""
  model = models.create(config, num_classes, kernels="xla")

  def explain_images(images: np.ndarray, targets: np.ndarray | None = None):
    pad = padding.pad
    chosen = None if targets is None else pad(np.asarray(targets, np.int32))
    found = jitted(model.apply, variables, pad(np.asarray(images)), chosen)
    return {name: np.asarray(value)[: len(images)] for name, value in found.items()}

  return explain_images


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """A heat map in [0, 1] (S, S) over a uint8 image (S, S, 3), coloured as
  the figures colour it ('jet'): uint8 (S, S, 3)."""
  colours = matplotlib.colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _unit(m: jax.Array) -> jax.Array:
  """Each map divided by its maximum (an all-zero map stays zero)."""
  top = m.max(axis=(1, 2), keepdims=True)
  return jnp.where(top > 0, m / jnp.where(top > 0, top, 1.0), 0.0)
