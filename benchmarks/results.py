"""Results files: every figure the docs quote, with how and where it was measured.

A results file is one JSON object, written whole by the benchmark or run that
measured it (`write`) and kept in `docs/results/`: `benchmark`, `command`
(as typed), `date`, `machine` (CPU model and vector extensions, cores,
platform), `versions`, the `config` it ran where there is one, and the
benchmark's own figures. `python -m benchmarks.report` renders the tables of
`docs/` from these files.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from simpsons_jax import files  # noqa: E402
from simpsons_jax.cpu_conv import cpu_description  # noqa: E402

PACKAGES = ("jax", "jaxlib", "flax", "optax", "tensorflow", "tensorflow-cpu")


def machine() -> dict[str, Any]:
  """The CPU (model and the vector extensions that matter), cores, platform."""
  return {
    "cpu": cpu_description(),
    "cores": os.cpu_count(),
    "platform": platform.platform(),
  }


def versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
  """The installed versions of those of `names` that are installed."""
  found = {}
  for name in names:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      found[name] = importlib.metadata.version(name)
  return found


def command() -> str:
  """This process's command line, as typed from the repository root."""
  return " ".join(["python", *sys.argv])


def write(
  path: str | os.PathLike,
  benchmark: str,
  figures: Mapping[str, Any],
  packages: Iterable[str] = PACKAGES,
) -> dict[str, Any]:
  """Writes and returns the results file `path` (whole, or not at all)."""
  report = {
    "benchmark": benchmark,
    "command": command(),
    "date": datetime.date.today().isoformat(),
    "machine": machine(),
    "versions": versions(packages),
    **figures,
  }
  files.write_text_atomic(path, json.dumps(report, indent=2) + "\n")
  return report
