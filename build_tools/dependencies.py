"""What an install of simpsons_jax needs, decided on the machine it installs on.

Read by setup.py (the run-time requirements, and whether to compile the CPU
kernels), by backend.py (the build requirements) and by
.ci/resolve_platforms.py (the same requirements, written for any machine).

Two things depend on the machine:
- TensorFlow (the input pipeline's): the smallest build each platform has,
  `tensorflow-cpu` on Linux x86-64 and Windows, `tensorflow` on macOS and Linux
  aarch64 (no CPU build there). Where a TensorFlow is already installed (Colab,
  Kaggle, conda), that one is required instead: a second distribution would
  write into the same `tensorflow/` folder and break both.
- The oneDNN CPU kernels (simpsons_jax/cpu_conv): compiled, with jaxlib's FFI
  headers and the oneDNN wheels, on x86-64 Linux only, and not where a GPU or
  TPU is attached (they run on the CPU backend only). SIMPSONS_JAX_CPU_KERNELS=1
  or 0 decides instead.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import site
import sys
import sysconfig
from collections.abc import Iterable, Mapping

# Minimum versions are the ones this project is tested with.
BASE = (
  "absl-py>=2.1",
  "clu>=0.0.12",
  # Paths on local disks and gs:// (simpsons_jax/files.py); 1.15 needs Python 3.11.
  "etils[epath]>=1.15",
  "flax>=0.12.8",
  "jax>=0.10.2",
  "matplotlib>=3.8",
  "ml-collections>=1.1.0",
  "numpy>=1.26",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12.8",
  "pillow>=10.0",
  # 2.20: TensorFlow 2.20 (Colab's, Kaggle's) pins its own TensorBoard to 2.20.
  "tensorboard>=2.20",
  "tensorflow-datasets>=4.9.10",
  # TFDS 4.9.10 imports it to build a data set, without declaring it.
  "importlib-resources>=6.0",
)
TENSORFLOW_VERSION = ">=2.20"
X86_LINUX = 'sys_platform == "linux" and platform_machine == "x86_64"'
ARM_LINUX = 'sys_platform == "linux" and platform_machine == "aarch64"'
# The smallest TensorFlow each platform has, for a machine without one.
TENSORFLOW = (
  f'tensorflow-cpu{TENSORFLOW_VERSION}; ({X86_LINUX}) or sys_platform == "win32"',
  f'tensorflow{TENSORFLOW_VERSION}; sys_platform == "darwin" or ({ARM_LINUX})',
)
# Distributions that install the `tensorflow` package, the preferred name first
# (on Windows `tensorflow` installs `tensorflow-intel` beside it).
TENSORFLOW_DISTRIBUTIONS = (
  "tensorflow",
  "tensorflow-cpu",
  "tensorflow-gpu",
  "tensorflow-macos",
  "tensorflow-intel",
  "intel-tensorflow",
  "tf-nightly",
  "tf-nightly-cpu",
)
ONEDNN = "2023.2.0"  # oneDNN 3.2.
# The oneDNN library the kernels load at run time.
KERNEL_RUNTIME = (f"onednn-cpu-gomp=={ONEDNN}; {X86_LINUX}",)
# What compiling them needs beside a C++17 compiler (jaxlib: the FFI headers).
KERNEL_BUILD = (
  "jaxlib>=0.10.2",
  f"onednn-cpu-gomp=={ONEDNN}",
  f"onednn-devel-cpu-gomp=={ONEDNN}",
)
# Device files of an attached accelerator: NVIDIA and AMD GPUs, Cloud TPUs
# (v2-v4 as /dev/accel*, v5 and later through VFIO).
ACCELERATOR_DEVICES = ("nvidiactl", "nvidia0", "kfd", "accel0", "vfio/0")


def installed_tensorflow(paths: Iterable[str] | None = None) -> str | None:
  """The distribution of a TensorFlow already installed where this install
  goes (`paths`, default the interpreter's site-packages: the ones pip installs
  into, visible even from an isolated build), or None."""
  if paths is None:
    paths = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    if site.ENABLE_USER_SITE:
      paths.append(site.getusersitepackages())
  found = {
    _normalized(d.metadata["Name"] or "")
    for d in importlib.metadata.distributions(path=[p for p in paths if p])
  }
  for name in TENSORFLOW_DISTRIBUTIONS:
    if _normalized(name) in found:
      return name
  return None


def _normalized(name: str) -> str:
  """A distribution's name as PEP 503 compares them."""
  return re.sub(r"[-_.]+", "-", name).lower()


def cpu_kernels(
  environ: Mapping[str, str] = os.environ,
  system: str = sys.platform,
  machine: str = platform.machine(),
  devices: str = "/dev",
) -> tuple[bool, str]:
  """(whether to compile the oneDNN CPU kernels here, why)."""
  wanted = environ.get("SIMPSONS_JAX_CPU_KERNELS", "").strip()
  if wanted in ("0", "1"):
    return wanted == "1", f"SIMPSONS_JAX_CPU_KERNELS={wanted}"
  if wanted:
    raise ValueError(f"SIMPSONS_JAX_CPU_KERNELS is {wanted!r}: set it to 1 or 0")
  if system != "linux" or machine not in ("x86_64", "AMD64"):
    return False, f"not x86-64 Linux ({system} {machine})"
  for device in ACCELERATOR_DEVICES:
    if os.path.exists(os.path.join(devices, device)):
      return False, f"an accelerator is attached (/dev/{device}); they run on CPUs only"
  return True, "an x86-64 Linux machine without an accelerator"


def install_requires(build_kernels: bool) -> list[str]:
  """The run-time requirements of an install on this machine."""
  tensorflow = installed_tensorflow()
  found = [f"{tensorflow}{TENSORFLOW_VERSION}"] if tensorflow else list(TENSORFLOW)
  return [*BASE, *found, *(KERNEL_RUNTIME if build_kernels else ())]


def any_machine() -> list[str]:
  """The run-time requirements written for any machine (environment markers):
  what a machine without TensorFlow and without an accelerator installs."""
  return [*BASE, *TENSORFLOW, *KERNEL_RUNTIME]
