"""Builds simpsons_jax; metadata lives in setup.cfg, the requirements that
depend on the machine in build_tools/dependencies.py.

The one compiled part is `simpsons_jax/cpu_conv/_onednn`: oneDNN's convolutions
as XLA FFI handlers, for x86-64 Linux CPUs (`dependencies.cpu_kernels` says
where). Its build needs a C++17 compiler, the oneDNN wheels and jaxlib's FFI
headers (build_tools/backend.py asks for them). Where any of that is missing
the extension is skipped with a warning, the install succeeds, and the models
use XLA's own convolutions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(__file__) or ".", "build_tools"))
import dependencies  # noqa: E402

ONEDNN_DEVEL = "onednn-devel-cpu-gomp"
ONEDNN_RUNTIME = "onednn-cpu-gomp"


def _file_in(distribution: str, name: str) -> str:
  """The folder holding the file `name` installed by `distribution`."""
  for file in importlib.metadata.distribution(distribution).files or []:
    if str(file).replace(os.sep, "/").endswith(name):
      path = str(file.locate())
      return path[: -len(name)].rstrip("/")
  raise FileNotFoundError(f"{distribution} installed no {name}")


def _onednn_extension(build: bool, why: str) -> list[Extension]:
  if not build:
    print(f"simpsons_jax: oneDNN kernels not built: {why}", file=sys.stderr)
    return []
  try:
    include = _file_in(ONEDNN_DEVEL, "oneapi/dnnl/dnnl.hpp")
    lib = _file_in(ONEDNN_RUNTIME, "libdnnl.so")
    jaxlib = importlib.util.find_spec("jaxlib")
    ffi_include = os.path.join(jaxlib.submodule_search_locations[0], "include")
  except (
    importlib.metadata.PackageNotFoundError,
    FileNotFoundError,
    AttributeError,
  ) as e:
    print(f"simpsons_jax: oneDNN kernels not built ({e})", file=sys.stderr)
    return []
  return [
    Extension(
      "simpsons_jax.cpu_conv._onednn",
      sources=["simpsons_jax/cpu_conv/onednn_conv.cc"],
      depends=[
        "simpsons_jax/cpu_conv/direct_kernels.inc",
        "simpsons_jax/cpu_conv/planar_kernels.inc",
      ],
      include_dirs=[include, ffi_include],
      library_dirs=[lib],
      libraries=[":libdnnl.so.3"],
      extra_compile_args=["-std=c++17", "-O3", "-fopenmp", "-ffp-contract=fast"]
      + ["-Wno-attributes", "-Wno-return-type"],
      extra_link_args=["-fopenmp"],
      language="c++",
    )
  ]


class OptionalBuildExt(build_ext):
  """Builds the extension if it can; a failure is a warning, not a failed install."""

  def run(self) -> None:
    try:
      super().run()
    except Exception as e:  # noqa: BLE001 - any compiler or linker failure.
      print(
        f"simpsons_jax: oneDNN kernels not built ({e}); XLA's convolutions will run",
        file=sys.stderr,
      )
      self.extensions = []  # Nothing to copy or install.


BUILD_KERNELS, WHY = dependencies.cpu_kernels()
setup(
  install_requires=dependencies.install_requires(BUILD_KERNELS),
  ext_modules=_onednn_extension(BUILD_KERNELS, WHY),
  cmdclass={"build_ext": OptionalBuildExt},
)
