"""Augmentation of training batches: shapes, labels, determinism, exactness;
mixup and CutMix."""

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import default
from simpsons_jax import augment, input_pipeline, mixing
from simpsons_jax.data import folder


def _all_on(config):
  a = config.augment
  a.flip, a.crop_min_area, a.shift, a.rotation_degrees = True, 0.5, 0.1, 15.0
  a.brightness, a.contrast, a.saturation = 0.2, 0.3, 0.3
  return config


def _images(n=8, size=24):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_default_configs_leave_pixels_alone():
  assert not augment.enabled(default.get_config().augment)
  assert augment.enabled(_all_on(default.get_config()).augment)


def test_same_seed_same_pixels_other_seed_other_pixels():
  config = _all_on(default.get_config())
  images = _images()
  a = augment.augment_batch(config.augment, images, tf.constant([3, 4], tf.int64))
  b = augment.augment_batch(config.augment, images, tf.constant([3, 4], tf.int64))
  c = augment.augment_batch(config.augment, images, tf.constant([3, 5], tf.int64))
  assert a.dtype == tf.uint8 and a.shape == images.shape
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, images)


def test_flip_alone_mirrors_exactly_about_half_of_the_images():
  config = default.get_config()
  config.augment.flip = True
  images = _images(n=64)
  out = augment.augment_batch(config.augment, images, tf.constant([0, 1], tf.int64))
  out = out.numpy()
  same = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
  mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
  assert all(s != m for s, m in zip(same, mirrored, strict=True))
  assert 16 <= sum(mirrored) <= 48


def test_affine_map_of_a_pure_shift_and_a_pure_rotation():
  config = default.get_config()
  config.augment.rotation_degrees = 90.0
  seed = tf.constant([0, 0], tf.int64)
  (a0, a1, a2, b0, b1, b2, c0, c1) = augment.affine_transforms(
    config.augment, 1, 9, seed
  ).numpy()[0]
  # A rotation about the centre (4, 4): the centre maps to itself.
  np.testing.assert_allclose([a0 * 4 + a1 * 4 + a2, b0 * 4 + b1 * 4 + b2], [4, 4])
  np.testing.assert_allclose([a0, a1], [b1, -b0], atol=1e-6)  # orthonormal
  np.testing.assert_allclose(a0**2 + b0**2, 1, rtol=1e-6)
  assert c0 == c1 == 0


def _batches(split, config, start_step=0):
  return list(input_pipeline.train_batches(split, config, start_step))


@pytest.fixture
def augmented_config(tiny_config):
  config = _all_on(tiny_config)
  config.train.num_epochs = 2
  return config


def test_training_batches_keep_shapes_and_labels(tiny_data_dir, augmented_config):
  images, cmap = _images_and_map(tiny_data_dir)
  split = folder.Files.of(images, cmap)
  plain_config = _all_on(augmented_config.copy_and_resolve_references())
  for key in ("flip", "shift", "rotation_degrees", "brightness", "contrast"):
    plain_config.augment[key] = type(plain_config.augment[key])(0)
  plain_config.augment.saturation = 0.0
  plain_config.augment.crop_min_area = 1.0
  augmented = _batches(split, augmented_config)
  plain = _batches(split, plain_config)
  assert len(augmented) == len(plain) == 2 * (len(split) // 16)
  for a, p in zip(augmented, plain, strict=True):
    assert a["image"].dtype == np.uint8 and a["image"].shape == p["image"].shape
    np.testing.assert_array_equal(a["label"], p["label"])
    assert not np.array_equal(a["image"], p["image"])


def test_resumed_pipeline_sees_the_same_augmented_batches(
  tiny_data_dir, augmented_config
):
  images, cmap = _images_and_map(tiny_data_dir)
  split = folder.Files.of(images, cmap)
  whole = _batches(split, augmented_config)
  resumed = _batches(split, augmented_config, start_step=5)
  assert len(resumed) == len(whole) - 5
  for a, b in zip(whole[5:], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
  # Two epochs of the same images are augmented differently.
  steps = len(split) // 16
  assert not np.array_equal(whole[0]["image"], whole[steps]["image"])


def _images_and_map(data_dir):
  from simpsons_jax import characters

  images = characters.find_images(data_dir)
  return images, characters.select(images, min_images=1)


def test_mixup_blends_each_image_with_its_mirror_in_the_batch():
  images = _images(5)
  mixed, lam = mixing.mix(jax.random.PRNGKey(3), images, "mixup", 0.4)
  lam = float(lam)
  assert 0 < lam < 1
  expected = lam * images.astype(np.float32) + (1 - lam) * images[::-1]
  np.testing.assert_allclose(np.asarray(mixed), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_pastes_one_box_and_lam_is_the_share_kept(seed):
  images = _images(6, size=20)
  mixed, lam = mixing.mix(jax.random.PRNGKey(seed), images, "cutmix", 1.0)
  mixed = np.asarray(mixed)
  assert mixed.dtype == np.uint8
  own = (mixed == images).all(-1)
  pasted = (mixed == images[::-1]).all(-1) & ~own
  assert (own | (mixed == images[::-1]).all(-1)).all()  # no pixel from elsewhere
  box = ~own[0]
  for i in range(len(images)):  # One box, at the same place in every image.
    np.testing.assert_array_equal(pasted[i], box)
  rows, cols = np.nonzero(box)
  if rows.size:
    assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
  assert float(lam) == pytest.approx(1 - box.mean())
