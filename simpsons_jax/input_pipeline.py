"""From image files to batches: split, decode, resize, cache, shuffle, batch.

Each image is decoded once per run: the resized uint8 images are cached (in
memory, or on disk under `config.cache_dir`) after the first pass. Training
reads one iterator over all remaining epochs, each epoch shuffled with a seed
derived from (seed, epoch) and augmented (if the config asks) with a seed
derived from (seed, epoch, batch), so a resumed run sees the same batches as
an uninterrupted one. Evaluation pads the last batch and marks real examples in
`mask`, so every example counts exactly once.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_collections
import numpy as np
import tensorflow as tf

from simpsons_jax import augment, characters, image_files, synthetic

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Split:
  """Image paths and their character ids."""

  paths: np.ndarray  # str
  labels: np.ndarray  # int32

  def __len__(self) -> int:
    return len(self.labels)


def examples(images: Mapping[str, list[Path]], cmap: characters.CharacterMap) -> Split:
  """Every image of the map's characters, labelled with the character id."""
  paths, labels = [], []
  for label, name in enumerate(cmap.names):
    paths += [str(p) for p in images[name]]
    labels += [label] * len(images[name])
  return Split(np.asarray(paths, dtype=str), np.asarray(labels, dtype=np.int32))


def data_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
  """The run's image folder; the synthetic one is generated on first use."""
  if config.dataset == "synthetic":
    return synthetic.generate(
      Path(workdir) / "synthetic_data",
      config.synthetic_images_per_character,
      config.seed,
    )
  if config.dataset == "folder":
    return characters.resolve_data_dir(config.data_dir)
  raise ValueError(
    f"Unknown --config.dataset={config.dataset!r}; use folder or synthetic."
  )


def decode_and_resize(path: tf.Tensor, image_size: int) -> tf.Tensor:
  """Reads a JPEG or PNG of any mode and returns uint8 RGB (image_size, image_size)."""
  return resize(image_files.decode(tf.io.read_file(path)), image_size)


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """A decoded uint8 image, antialiased to (image_size, image_size)."""
  image = tf.image.resize(image, (image_size, image_size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _cache_file(cache_dir: str, split: Split, image_size: int) -> str:
  """A cache file name that changes whenever the files or the size change."""
  if not cache_dir:
    return ""
  digest = hashlib.sha256(str(image_size).encode())
  for path, label in zip(split.paths, split.labels, strict=True):
    digest.update(f"{path}\0{label}\n".encode())
  os.makedirs(cache_dir, exist_ok=True)
  prefix = os.path.join(cache_dir, f"images_{digest.hexdigest()[:16]}")
  if not os.path.exists(prefix + ".index"):
    # Left by a run killed while writing it: tf.data would refuse the lock.
    for stale in glob.glob(glob.escape(prefix) + "*"):
      os.remove(stale)
  return prefix


def decoded_dataset(
  split: Split, image_size: int, cache_dir: str = ""
) -> tf.data.Dataset:
  """Decoded, resized examples in split order, cached after the first pass.

  The files passed `image_files`' checks, with the same decoder: one that
  fails now changed during the run, and stops it.
  """
  ds = tf.data.Dataset.from_tensor_slices((split.paths, split.labels))
  ds = ds.map(
    lambda path, label: {"image": decode_and_resize(path, image_size), "label": label},
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  return ds.cache(_cache_file(cache_dir, split, image_size))


def epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  """The shuffle seed of one epoch."""
  return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def process_shard(split: Split, index: int, count: int) -> Split:
  """The examples process `index` of `count` reads: every count-th one."""
  idx = np.arange(index, len(split), count)
  return Split(split.paths[idx], split.labels[idx])


def train_batches(
  split: Split,
  config: ml_collections.ConfigDict,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """This process's part of each shuffled training batch, from `start_step` on.

  Each of `process_count` processes reads its own shard of the files and
  yields `config.batch_size // process_count` rows per step. The last partial
  batch of each epoch is dropped. Batch `s` is the same whatever step the
  iterator started from.
  """
  batch_size = config.batch_size // process_count
  steps_per_epoch = len(split) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(
      f"The training split has {len(split)} images, fewer than one batch of "
      f"{config.batch_size}: lower --config.batch_size or use more data."
    )
  split = process_shard(split, process_index, process_count)
  decoded = decoded_dataset(split, config.image_size, config.cache_dir)
  first_epoch, offset = divmod(start_step, steps_per_epoch)

  def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
    seed = epoch_seed(config.seed, epoch)
    shuffled = decoded.shuffle(len(split), seed=seed)
    batches = shuffled.batch(batch_size, drop_remainder=True).take(steps_per_epoch)
    if not augment.enabled(config.augment):
      return batches

    def augmented(index, batch):
      batch_seed = tf.stack([seed, index * process_count + process_index])
      image = augment.augment_batch(config.augment, batch["image"], batch_seed)
      return {**batch, "image": image}

    return batches.enumerate().map(augmented, num_parallel_calls=2)

  ds = tf.data.Dataset.range(first_epoch, config.num_epochs).flat_map(one_epoch)
  ds = ds.skip(offset).prefetch(2)
  # Autotuning a pipeline of many epochs made its teardown wait tens of seconds.
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options).as_numpy_iterator()


def eval_batches(
  split: Split,
  image_size: int,
  batch_size: int,
  cache_dir: str = "",
  process_index: int = 0,
  process_count: int = 1,
) -> list[Batch]:
  """This process's share of `split`, in order, padded with `mask`=0.

  Every process gets the same number of batches of `batch_size //
  process_count` rows, so that together they cover `split` exactly once.
  """
  batch_size //= process_count
  shard = process_shard(split, process_index, process_count)
  ds = decoded_dataset(shard, image_size, cache_dir).batch(batch_size)
  batches = [
    pad_batch(batch, batch_size)
    for batch in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
  ]
  per_process = -(-len(split) // process_count)
  empty = {
    "image": np.zeros((0, image_size, image_size, 3), np.uint8),
    "label": np.zeros(0, np.int32),
  }
  while len(batches) < -(-per_process // batch_size):
    batches.append(pad_batch(empty, batch_size))
  return batches


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pads every array to `batch_size` rows and adds `mask` (1 real, 0 padding)."""
  n = len(next(iter(batch.values())))
  padded = {
    key: np.concatenate(
      [value, np.zeros((batch_size - n, *value.shape[1:]), value.dtype)]
    )
    for key, value in batch.items()
  }
  padded["mask"] = (np.arange(batch_size) < n).astype(np.float32)
  return padded
