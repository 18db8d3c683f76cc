"""The device mesh and how arrays are laid out on it.

Data parallel: a 1-D mesh over all devices with the axis `data`. Batches are
split along it; the train state is replicated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D `data` mesh over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the mesh."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises unless the global batch splits evenly over the mesh's devices."""
  if batch_size % mesh.size:
    raise ValueError(
      f"batch_size={batch_size} does not split over {mesh.size} devices: use a "
      f"multiple of {mesh.size}, e.g. --config.batch_size="
      f"{max(mesh.size, batch_size // mesh.size * mesh.size)}."
    )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host batch (a pytree of numpy arrays) on the mesh, split on `data`."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x), batch
  )


def prefetch(batches: Iterable[Any], mesh: Mesh, size: int = 2) -> Iterator[Any]:
  """Shards host batches onto the mesh, keeping `size` batches in flight."""
  queue = []
  for batch in batches:
    queue.append(shard_batch(batch, mesh))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue
