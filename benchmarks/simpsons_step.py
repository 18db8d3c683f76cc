"""simpsons_jax's own training step and inference pass on a fixed batch: the
workload that `speed.py` times against its peers and `step_parts.py` sets
beside its parts; and the warm-up both give whatever they time."""

from __future__ import annotations

import time
from collections.abc import Callable

import ml_collections


def warm_up(
  call: Callable[[], object], seconds: float = 2.0, at_least: int = 3
) -> None:
  """Calls `call()` for `seconds` and at least `at_least` times before it is
  timed: compilation, and the first steps in which the allocator's heap grows
  to its working size."""
  calls, start = 0, time.perf_counter()
  while calls < at_least or time.perf_counter() - start < seconds:
    call()
    calls += 1


def prepared(
  config: ml_collections.ConfigDict, mode: str, batch: int, num_classes: int
) -> tuple[Callable[[], None], str]:
  """`step()`, one training step (`mode` 'train', the state carried from call
  to call) or one inference pass ('infer') of `config`'s model on a random
  uint8 batch, returning when it is done; and what ran, in words."""
  from simpsons_jax import host_memory

  host_memory.keep_freed_memory()  # As main.py does, before JAX runs.
  import jax
  import numpy as np

  from simpsons_jax import convolutions, evaluators, models, sharding, train

  size = config.data.image_size
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = train.initial_state(
    models.create(config, num_classes), config, mesh, steps_per_epoch=1
  )
  rng = np.random.default_rng(0)
  data = sharding.shard_batch(
    {
      "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
      "label": rng.integers(0, num_classes, batch, dtype=np.int32),
      "mask": np.ones(batch, np.float32),
    },
    mesh,
  )
  train_step = train.jit_train_step(mesh, config)
  score = evaluators.scorer(mesh, state.apply_fn, num_classes, config.test_time_flip)
  holder = [state]

  def step() -> None:
    if mode == "train":
      holder[0], sums = train_step(holder[0], data)
    else:
      sums = score(holder[0].inference_variables(), data)
    jax.block_until_ready(sums)

  kernels = convolutions.implementation(config)[1]
  dtype, conv_bfloat16, _ = convolutions.precision(
    config, convolutions.implementation(config)[0]
  )
  rounded = "convolutions"
  if config.model.name == "simpsons_cnn":
    rounded += " and dense layers"
  computing = f"bfloat16 {rounded}, float32 else" if conv_bfloat16 else dtype
  return (
    step,
    f"jax {jax.__version__}, convolutions {kernels}, computing in {computing}",
  )
