"""The device mesh and how arrays are laid out on it.

Data parallel: a 1-D mesh over all devices with the axis `data`. Batches are
split along it; the train state is replicated.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simpsons_jax import errors

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
    raise errors.UserError(
      f"batch_size={batch_size} does not split over {mesh.size} devices: use a "
      f"multiple of {mesh.size}, e.g. --config.train.batch_size="
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


def accelerator_present() -> str | None:
  """'GPU' or 'TPU' when this machine has one, whatever JAX is using."""
  if (
    glob.glob("/dev/accel*")
    or os.environ.get("COLAB_TPU_ADDR")
    or os.environ.get("TPU_NAME")
  ):
    return "TPU"
  if glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi"):
    return "GPU"
  return None


def describe_devices(mesh: Mesh, require_accelerator: bool = False) -> None:
  """Logs platform, device kind and count; warns when JAX missed an accelerator.

  With `require_accelerator`, training on CPU is an error instead.
  """
  device = mesh.devices.flat[0]
  logging.info(
    "Devices: %d x %s (%s), %d process(es); mesh %s.",
    mesh.size,
    device.device_kind,
    device.platform,
    jax.process_count(),
    dict(mesh.shape),
  )
  if device.platform != "cpu":
    return
  present = accelerator_present()
  if present is None and not require_accelerator:
    return
  where = f" although a {present} is present" if present else ""
  message = (
    f"JAX is running on the CPU{where}. "
    "Fixes: install the JAX build for it (pip install -U 'jax[cuda12]' for a "
    "GPU, 'jax[tpu]' for a TPU) and restart; on Colab/Kaggle run training in a "
    "fresh process (!python main.py ...) and do not import jax in the notebook "
    "first: only one process can hold a TPU."
  )
  if require_accelerator:
    raise errors.UserError(message + " (require_accelerator=True)")
  logging.warning("%s", "!" * 20 + " " + message)
