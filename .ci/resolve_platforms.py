"""Resolves the project's dependencies for every platform it supports, from here.

  python .ci/resolve_platforms.py

For each platform and Python version below, `uv pip compile` resolves the base
requirements (build_tools/dependencies.py, as for a machine without TensorFlow)
and the extras of setup.cfg that should work there, evaluating
every environment marker (the dependencies' too) for that platform and
insisting on a wheel for it (`--only-binary :all:`; `promise`, a dependency of
tensorflow-datasets, is pure Python published as source only). Prints one line
per pair and exits 1 if any pair does not resolve.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_tools"))
import dependencies  # noqa: E402

PLATFORMS = {
  "Linux x86-64": "x86_64-manylinux_2_28",
  "Linux aarch64": "aarch64-manylinux_2_28",
  "macOS arm64": "aarch64-apple-darwin",
  "Windows x86-64": "x86_64-pc-windows-msvc",
}
PYTHONS = ("3.11", "3.12", "3.13")
EXTRAS = ("serve", "video", "test")


def requirements() -> list[str]:
  """The base requirements and setup.cfg's EXTRAS, one requirement a line."""
  setup = configparser.ConfigParser()
  setup.read(ROOT / "setup.cfg")
  lines = dependencies.any_machine()
  for extra in EXTRAS:
    lines += setup["options.extras_require"][extra].splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def main() -> int:
  with tempfile.TemporaryDirectory() as folder:
    wanted = Path(folder) / "requirements.in"
    wanted.write_text("\n".join(requirements()) + "\n")
    failed = 0
    for name, platform in PLATFORMS.items():
      for python in PYTHONS:
        result = subprocess.run(
          [
            "uv",
            "pip",
            "compile",
            str(wanted),
            "--quiet",
            "--python-platform",
            platform,
          ]
          + [
            "--python-version",
            python,
            "--only-binary",
            ":all:",
            "--no-binary",
            "promise",
          ],
          capture_output=True,
          text=True,
          check=False,
        )
        if result.returncode == 0:
          flavour = [
            line.split("==")[0]
            for line in result.stdout.splitlines()
            if line.startswith(("tensorflow==", "tensorflow-cpu=="))
          ]
          print(f"resolved  {name:15} Python {python}  ({', '.join(flavour)})")
        else:
          failed += 1
          why = [line for line in result.stderr.splitlines() if line.strip()][-3:]
          print(f"FAILED    {name:15} Python {python}: {' '.join(why)[:400]}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
