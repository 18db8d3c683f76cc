"""Random augmentation of training batches in tf.data, seeded per batch.

A random resized crop, a shift, a rotation and a mirror compose into one
affine map per image, applied to the whole batch in one bilinear warp
(edges reflected); colour jitter follows. Every random number comes from
`tf.random.stateless_uniform` with the batch's seed, so a batch is augmented
the same way whenever it is read, and a resumed run sees the same pixels.
"""

from __future__ import annotations

import math

import ml_collections
import tensorflow as tf

MAX_LOG_ASPECT = math.log(4 / 3)  # Random resized crops keep aspect in [3/4, 4/3].


def _geometric(augment: ml_collections.ConfigDict) -> bool:
  return bool(
    augment.flip
    or augment.crop_min_area < 1
    or augment.shift > 0
    or augment.rotation_degrees > 0
  )


def enabled(augment: ml_collections.ConfigDict) -> bool:
  """Whether `config.augment` changes any pixel."""
  return (
    _geometric(augment)
    or max(augment.brightness, augment.contrast, augment.saturation) > 0
  )


def _uniform(seed: tf.Tensor, index: int, shape, low, high) -> tf.Tensor:
  """Stateless uniform numbers; `index` gives each kind of draw its own stream."""
  stream = tf.stack([seed[0], seed[1] * 16 + index])
  return tf.random.stateless_uniform(shape, stream, low, high, dtype=tf.float32)


def affine_transforms(
  augment: ml_collections.ConfigDict, batch: int, size: int, seed: tf.Tensor
) -> tf.Tensor:
  """(batch, 8) maps from output to input pixel coordinates (ImageProjectiveTransform).

  Input = centre + R(angle) diag(mirror * sx, sy) (output - centre) + t: a crop
  of area sx*sy of the image, shifted by t, rotated and maybe mirrored.
  """
  area = _uniform(seed, 0, [batch], augment.crop_min_area, 1.0)
  if augment.crop_min_area < 1:
    log_aspect = _uniform(seed, 1, [batch], -MAX_LOG_ASPECT, MAX_LOG_ASPECT)
  else:
    log_aspect = tf.zeros([batch])
  sx = tf.minimum(tf.sqrt(area * tf.exp(log_aspect)), 1.0)
  sy = tf.minimum(tf.sqrt(area / tf.exp(log_aspect)), 1.0)
  # The crop lies inside the image; the shift may move it past the edge.
  half = size / 2
  tx = _uniform(seed, 2, [batch], -1.0, 1.0) * (1 - sx) * half
  ty = _uniform(seed, 3, [batch], -1.0, 1.0) * (1 - sy) * half
  tx += _uniform(seed, 4, [batch], -augment.shift, augment.shift) * size
  ty += _uniform(seed, 5, [batch], -augment.shift, augment.shift) * size
  angle = _uniform(seed, 6, [batch], -1.0, 1.0) * math.radians(augment.rotation_degrees)
  mirror = tf.ones([batch])
  if augment.flip:
    mirror = tf.where(_uniform(seed, 7, [batch], 0.0, 1.0) < 0.5, -1.0, 1.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  a0, a1 = cos * mirror * sx, -sin * sy
  b0, b1 = sin * mirror * sx, cos * sy
  centre = (size - 1) / 2
  a2 = centre + tx - a0 * centre - a1 * centre
  b2 = centre + ty - b0 * centre - b1 * centre
  zeros = tf.zeros([batch])
  return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def colour_jitter(
  augment: ml_collections.ConfigDict, images: tf.Tensor, seed: tf.Tensor
) -> tf.Tensor:
  """Random brightness, contrast and saturation of float images in [0, 255]."""
  batch = tf.shape(images)[0]
  shape = [batch, 1, 1, 1]
  if augment.saturation > 0:
    factor = _uniform(seed, 8, shape, 1 - augment.saturation, 1 + augment.saturation)
    gray = tf.image.rgb_to_grayscale(images)
    images = gray + factor * (images - gray)
  if augment.contrast > 0:
    factor = _uniform(seed, 9, shape, 1 - augment.contrast, 1 + augment.contrast)
    mean = tf.reduce_mean(images, axis=(1, 2, 3), keepdims=True)
    images = mean + factor * (images - mean)
  if augment.brightness > 0:
    delta = _uniform(seed, 10, shape, -augment.brightness, augment.brightness)
    images = images + 255.0 * delta
  return images


def augment_batch(
  augment: ml_collections.ConfigDict, images: tf.Tensor, seed: tf.Tensor
) -> tf.Tensor:
  """Augments a uint8 batch (B, S, S, 3) with the int64 `seed` (2,); uint8 out."""
  size = images.shape[1]
  x = tf.cast(images, tf.float32)
  if _geometric(augment):
    x = tf.raw_ops.ImageProjectiveTransformV3(
      images=x,
      transforms=affine_transforms(augment, tf.shape(x)[0], size, seed),
      output_shape=tf.shape(x)[1:3],
      fill_value=0.0,
      interpolation="BILINEAR",
      fill_mode="REFLECT",
    )
  x = colour_jitter(augment, x, seed)
  return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
