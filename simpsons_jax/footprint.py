"""How much memory a run needs, estimated before anything is built, and the
refusal of one that cannot fit.

`--config.data.image_size=100000` asks the notebook's network for 1.28
trillion parameters: building it would take the machine's memory and die
without a word, or hang. `check` estimates from shapes alone
(`jax.eval_shape`: nothing is allocated) what training holds on each device
(parameters, gradients, optimizer state and EMA in float32, and one batch's
activations) and `check_cache` what the decoded-image cache holds in host
memory, and refuses in one sentence what exceeds the memory there. The
estimates are lower bounds (XLA needs temporaries beyond them): a run they
pass may still need more, one they refuse can never fit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from simpsons_jax import errors, models

# Optimizer slots per parameter (Adam's two moments, SGD's momentum).
SLOTS = {"adam": 2, "adamw": 2, "sgd": 1}


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes training holds on one device, from shapes."""

  parameters: int  # How many (float32 each).
  state_bytes: int  # Parameters, gradients, optimizer slots, EMA.
  activation_bytes: int  # Every layer's output for one device's batch.

  @property
  def total(self) -> int:
    return self.state_bytes + self.activation_bytes


def estimate(
  config: ml_collections.ConfigDict, num_classes: int, devices: int = 1
) -> Estimate:
  """The bytes a training step of `config` holds per device, from shapes."""
  model = models.create(config, num_classes, kernels="xla")
  size = config.data.image_size
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
  variables = jax.eval_shape(
    functools.partial(models.init_variables, model, size), jax.random.key(0)
  )
  parameters = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
  copies = 2 + SLOTS.get(config.optim.name, 2) + (config.optim.ema_decay > 0)
  outputs = jax.eval_shape(
    lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    ),
    variables,
    image,
  )[1]
  per_image = sum(
    math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(outputs)
  )
  per_device = max(1, config.train.batch_size // devices)
  return Estimate(parameters, 4 * parameters * copies, per_image * per_device)


def memory_per_device() -> tuple[int, str]:
  """The memory of one device (bytes) and what it is, for a sentence: an
  accelerator's own, or on CPU the host's (its container's limit if lower)."""
  device = jax.local_devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
      return int(stats["bytes_limit"]), f"one {device.device_kind}"
  return host_memory_bytes() // max(1, jax.local_device_count()), "this machine"


def host_memory_bytes() -> int:
  """The host's physical memory, or its container's (cgroup) limit if lower."""
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  try:
    with open("/sys/fs/cgroup/memory.max") as f:
      limit = f.read().strip()
  except OSError:
    return total
  return min(total, int(limit)) if limit.isdigit() else total


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """UserError in one sentence when training `config` cannot fit in memory."""
  found = estimate(config, num_classes=2, devices=mesh.size)
  available, where = memory_per_device()
  if found.total <= available:
    return
  raise errors.UserError(
    f"--config.data.image_size={config.data.image_size} with "
    f"--config.model.name={config.model.name} and --config.train.batch_size="
    f"{config.train.batch_size} needs at least {_size(found.total)} per device to "
    f"train ({found.parameters:,} parameters), more than the {_size(available)} of "
    f"{where}: lower the image size or the batch, or choose a smaller model "
    "(nothing was written)."
  )


def check_cache(config: ml_collections.ConfigDict, images: int) -> None:
  """UserError when the in-memory cache of `images` decoded images (training
  and validation) cannot fit in the host's memory."""
  if config.data.cache_dir:
    return
  needed = images * config.data.image_size**2 * 3
  available = host_memory_bytes()
  if needed <= available:
    return
  raise errors.UserError(
    f"{images:,} images decoded at --config.data.image_size="
    f"{config.data.image_size} take {_size(needed)} in the in-memory cache, more "
    f"than this machine's {_size(available)}: set --config.data.cache_dir to a "
    "folder on a disk with room, or lower the image size."
  )


def _size(count: int) -> str:
  for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
    if count >= scale:
      return f"{count / scale:.1f} {unit}"
  return f"{count} bytes"
