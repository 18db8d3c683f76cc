"""From a data source's examples to training batches: shuffle, augment, batch.

Each image is decoded once per run: the resized uint8 images are cached (in
memory, or on disk under `config.data.cache_dir`) after the first pass (see
`data.core.Examples.decoded`). Training
reads one iterator over all remaining epochs, each epoch shuffled with a seed
derived from (seed, epoch) and augmented (if the config asks) with a seed
derived from (seed, epoch, batch), so a resumed run sees the same batches as
an uninterrupted one. Evaluation's batches are `data.core.eval_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import ml_collections
import tensorflow as tf

from simpsons_jax import augment, errors

if TYPE_CHECKING:
  from simpsons_jax.data import core


def epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  """The shuffle seed of one epoch."""
  return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def train_batches(
  examples: core.Examples,
  config: ml_collections.ConfigDict,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[core.Batch]:
  """This process's part of each shuffled training batch, from `start_step` on.

  Each of `process_count` processes reads its own shard of the files and
  yields `config.train.batch_size // process_count` rows per step. The last partial
  batch of each epoch is dropped. Batch `s` is the same whatever step the
  iterator started from.
  """
  batch_size = config.train.batch_size // process_count
  steps_per_epoch = len(examples) // config.train.batch_size
  if steps_per_epoch == 0:
    raise errors.UserError(
      f"The training split has {len(examples)} images, fewer than one batch of "
      f"{config.train.batch_size}: lower --config.train.batch_size or use more data."
    )
  shard_size = examples.shard_size(process_index, process_count)
  decoded = examples.decoded(
    config.data.image_size, config.data.cache_dir, process_index, process_count
  )
  first_epoch, offset = divmod(start_step, steps_per_epoch)

  def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
    seed = epoch_seed(config.seed, epoch)
    shuffled = decoded.shuffle(shard_size, seed=seed)
    batches = shuffled.batch(batch_size, drop_remainder=True).take(steps_per_epoch)
    if not augment.enabled(config.augment):
      return batches

    def augmented(index, batch):
      batch_seed = tf.stack([seed, index * process_count + process_index])
      image = augment.augment_batch(config.augment, batch["image"], batch_seed)
      return {**batch, "image": image}

    return batches.enumerate().map(augmented, num_parallel_calls=2)

  ds = tf.data.Dataset.range(first_epoch, config.train.num_epochs).flat_map(one_epoch)
  ds = ds.skip(offset).prefetch(2)
  # Autotuning a pipeline of many epochs made its teardown wait tens of seconds.
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options).as_numpy_iterator()
