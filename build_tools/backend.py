"""The build backend: setuptools', asking for the CPU kernels' build
requirements (jaxlib, the oneDNN wheels) only where they will be compiled
(dependencies.cpu_kernels)."""

from __future__ import annotations

from typing import Any

import dependencies
from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403 - the other hooks, unchanged.


def _kernel_build() -> list[str]:
  return list(dependencies.KERNEL_BUILD) if dependencies.cpu_kernels()[0] else []


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
  return build_meta.get_requires_for_build_wheel(config_settings) + _kernel_build()


def get_requires_for_build_editable(config_settings: Any = None) -> list[str]:
  return build_meta.get_requires_for_build_editable(config_settings) + _kernel_build()
