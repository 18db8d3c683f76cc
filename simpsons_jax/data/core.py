"""What the training loop and the evaluators ask of a data set.

A `DataSource` names the run's characters and hands out its training and
validation `Examples`: a known number of labelled images in a fixed order,
decoded and resized by `tf.data`, cached after the first pass under a key
that changes with the content, and read by each process in its own shard
(every `process_count`-th example from `process_index` on). The loop never
learns where the images come from.
"""

from __future__ import annotations

import abc
import glob
import hashlib
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from etils import epath

from simpsons_jax import characters, files, image_files, padding


class Examples(abc.ABC):
  """Labelled images in a fixed order; `labels` holds every label in it."""

  labels: np.ndarray  # int32, character ids, in example order.

  def __len__(self) -> int:
    return len(self.labels)

  @abc.abstractmethod
  def cache_key(self) -> str:
    """A text that changes whenever the examples' content or order change."""

  @abc.abstractmethod
  def encoded(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """(encoded image bytes, label) of every `process_count`-th example from
    `process_index` on, in example order."""

  @abc.abstractmethod
  def frames(self, indices: Sequence[int]) -> list[str | np.ndarray]:
    """The examples at `indices` at full size, to draw: a file, or pixels."""

  def select(self, keep: np.ndarray) -> Examples:
    """The examples where `keep` (bool, one per example) is true, in order.
    Sources whose examples can be negatives (label -1) implement it."""
    raise NotImplementedError(f"{type(self).__name__} has no negatives to set apart")

  def model_inputs(self, indices: Sequence[int], image_size: int) -> np.ndarray:
    """The examples at `indices` as the model sees them: uint8 (N, size,
    size, 3), decoded and resized as training does."""
    unique, inverse = np.unique(np.asarray(indices, np.int64), return_inverse=True)
    slot = np.full(len(self), -1, np.int64)
    slot[unique] = np.arange(len(unique))
    slots = tf.constant(slot)
    ds = self.encoded().enumerate()
    ds = ds.filter(lambda i, example: slots[i] >= 0)
    ds = ds.map(
      lambda i, example: (slots[i], resize(image_files.decode(example[0]), image_size))
    )
    pixels = np.zeros((len(unique), image_size, image_size, 3), np.uint8)
    for position, image in ds.as_numpy_iterator():
      pixels[position] = image
    return pixels[inverse]

  def decoded(
    self,
    image_size: int,
    cache_dir: str = "",
    process_index: int = 0,
    process_count: int = 1,
  ) -> tf.data.Dataset:
    """This process's share as {image: uint8 (size, size, 3), label}, cached.

    The images passed `image_files`' checks with the same decoder: one that
    fails now changed during the run, and stops it.
    """
    ds = self.encoded(process_index, process_count).map(
      lambda contents, label: {
        "image": resize(image_files.decode(contents), image_size),
        "label": label,
      },
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    key = f"{self.cache_key()}\0{image_size}\0{process_index}\0{process_count}"
    return ds.cache(_cache_file(cache_dir, key))

  def shard_size(self, process_index: int = 0, process_count: int = 1) -> int:
    """How many examples process `process_index` of `process_count` reads."""
    return len(range(process_index, len(self), process_count))


Loaded = tuple[characters.CharacterMap, Examples, Examples]


def set_apart_negatives(examples: Examples) -> tuple[Examples, Examples | None]:
  """The examples of the model's characters, and the negatives (label -1,
  `config.data.negatives`) or None when there are none."""
  negative = examples.labels < 0
  if not negative.any():
    return examples, None
  return examples.select(~negative), examples.select(negative)


# A batch of arrays by name ('image', 'label', and 'mask' when padded).
Batch = dict[str, np.ndarray]


class DataSource(abc.ABC):
  """Where a run's images come from: its characters and its two splits."""

  @abc.abstractmethod
  def prepare(self, workdir: epath.Path) -> Loaded:
    """Process 0, at the start of training: checks the data, decides (or
    keeps) the character map and the split, and saves them in `workdir`."""

  @abc.abstractmethod
  def load(self, workdir: epath.Path) -> Loaded:
    """What `prepare` last decided, read back without writing anything."""

  @abc.abstractmethod
  def validation(self, workdir: epath.Path, report_dir: epath.Path | None) -> Examples:
    """The run's validation examples as they are now, for `--mode=evaluate`;
    file checks and reports go to `report_dir`."""


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """A decoded uint8 image, antialiased to (image_size, image_size)."""
  image = tf.image.resize(image, (image_size, image_size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _cache_file(cache_dir: str, key: str) -> str:
  """'' (in memory), or a file under `cache_dir` named by a hash of `key`."""
  if not cache_dir:
    return ""
  cache_dir = os.fspath(files.as_path(cache_dir))
  tf.io.gfile.makedirs(cache_dir)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  prefix = f"{cache_dir.rstrip('/')}/images_{digest}"
  if not tf.io.gfile.exists(prefix + ".index"):
    # Left by a run killed while writing it: tf.data would refuse the lock.
    for stale in tf.io.gfile.glob(glob.escape(prefix) + "*"):
      tf.io.gfile.remove(stale)
  return prefix


def eval_batches(
  examples: Examples,
  image_size: int,
  batch_size: int,
  cache_dir: str = "",
  process_index: int = 0,
  process_count: int = 1,
) -> list[Batch]:
  """This process's share of `examples`, in order, padded with `mask`=0.

  Every process gets the same number of batches of `batch_size //
  process_count` rows, so that together they cover `examples` exactly once.
  """
  batch_size //= process_count
  decoded = examples.decoded(image_size, cache_dir, process_index, process_count)
  ds = decoded.batch(batch_size)
  batches = [
    pad_batch(batch, batch_size)
    for batch in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
  ]
  per_process = -(-len(examples) // process_count)
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
  padded = {key: padding.pad(value, batch_size) for key, value in batch.items()}
  padded["mask"] = (np.arange(batch_size) < n).astype(np.float32)
  return padded
