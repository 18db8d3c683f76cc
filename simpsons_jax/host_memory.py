"""glibc's malloc set up so that XLA:CPU reuses a step's memory.

XLA:CPU allocates the temporaries of each step afresh: one block per executable
run, from its own threads. glibc gives threads other than the main one arenas
whose heaps hold at most 64 MiB, so a larger block is mapped anew at every step
and unmapped when freed, and the step then page-faults through all of it. With
one arena every block comes from the main heap, where a high mmap threshold
keeps it and a high trim threshold keeps its pages when freed: the next step
finds them mapped. Memory then stays at its peak instead of shrinking between
steps, and compilations, whose threads now share the one arena, take longer
(once a run). docs/performance.md says how the CPU path is fast.

The arena limit counts only for threads that have not allocated yet, so the
setting is an explicit call made before JAX starts its CPU client: main.py makes
it first thing, and a notebook can make it in its first cell
(`host_memory.keep_freed_memory()`); made later, it refuses with a warning.
Importing `simpsons_jax` changes nothing. It is left alone where JAX has an
accelerator plugin or `JAX_PLATFORMS` names another platform first: there the
host runs the input pipeline, whose threads would then share one arena, and the
device holds the step's memory. Set `SIMPSONS_JAX_KEEP_MEMORY=0` to leave malloc
as it is (the benchmarks' reference frameworks run so).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import platform
import sys

from absl import logging

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def _cpu_is_the_device() -> bool:
  """Whether JAX will run on the CPU, decided without starting JAX."""
  platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  return not importlib.metadata.entry_points(group="jax_plugins")


def _jax_started() -> bool:
  """Whether this process's JAX has started its backends (and their threads)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # Another JAX: assume not.
    return False


def kept() -> bool:
  """Whether `keep_freed_memory` took effect in this process."""
  return keep_freed_memory.cache_info().currsize > 0 and keep_freed_memory()


@functools.cache
def keep_freed_memory() -> bool:
  """Has glibc serve every block from one arena and keep freed blocks mapped.

  Call it before JAX computes anything (main.py does). Returns whether glibc
  took the settings: False off Linux, on other C libraries, where JAX runs on
  an accelerator or `SIMPSONS_JAX_KEEP_MEMORY=0`, and, with a warning, once
  JAX has started (its threads' arenas exist: the setting would do half its job).
  """
  if os.environ.get("SIMPSONS_JAX_KEEP_MEMORY", "1") == "0":
    return False
  if platform.system() != "Linux" or not _cpu_is_the_device():
    return False
  if _jax_started():
    logging.warning(
      "host_memory.keep_freed_memory() came after JAX started, whose threads "
      "already have their own malloc arenas: malloc is left as it is. Call it "
      "before anything runs on JAX (a notebook's first cell)."
    )
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    return bool(
      libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
      and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
      and libc.mallopt(_M_ARENA_MAX, 1)
    )
  except (OSError, AttributeError):
    return False
