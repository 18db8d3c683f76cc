"""What an install needs on a given machine (build_tools/dependencies.py)."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "build_tools"))
import dependencies  # noqa: E402


def _installed(folder: Path, *names: str) -> str:
  for name in names:
    info = folder / f"{name.replace('-', '_')}-2.20.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
      f"Metadata-Version: 2.1\nName: {name}\nVersion: 2.20.0\n"
    )
  return str(folder)


def _tensorflows(requirements: list[str]) -> list[str]:
  return [r for r in requirements if re.split("[<>=;]", r)[0] in TENSORFLOWS]


TENSORFLOWS = dependencies.TENSORFLOW_DISTRIBUTIONS


def test_a_tensorflow_already_installed_is_the_one_required(tmp_path, monkeypatch):
  assert dependencies.installed_tensorflow([_installed(tmp_path / "none")]) is None
  assert (
    dependencies.installed_tensorflow([_installed(tmp_path / "colab", "tensorflow")])
    == "tensorflow"
  )
  windows = _installed(tmp_path / "windows", "tensorflow-intel", "tensorflow")
  assert dependencies.installed_tensorflow([windows]) == "tensorflow"
  nightly = _installed(tmp_path / "nightly", "tf-nightly")
  assert dependencies.installed_tensorflow([nightly]) == "tf-nightly"

  monkeypatch.setattr(dependencies, "installed_tensorflow", lambda: "tensorflow")
  over_colab = dependencies.install_requires(build_kernels=True)
  assert _tensorflows(over_colab) == ["tensorflow>=2.20"]  # Only the one there.
  monkeypatch.setattr(dependencies, "installed_tensorflow", lambda: None)
  fresh = dependencies.install_requires(build_kernels=False)
  assert _tensorflows(fresh) == list(dependencies.TENSORFLOW)
  assert not [r for r in fresh if r.startswith("onednn")]  # No kernels, no oneDNN.
  assert dependencies.install_requires(True)[-1].startswith("onednn-cpu-gomp==")


@pytest.mark.parametrize(
  "environ, system, machine, device, built",
  [
    ({}, "linux", "x86_64", None, True),
    ({}, "linux", "x86_64", "nvidiactl", False),  # A GPU host.
    ({}, "linux", "x86_64", "accel0", False),  # A TPU VM (v2-v4).
    ({}, "linux", "x86_64", "vfio/0", False),  # A TPU VM (v5e and later).
    ({}, "linux", "aarch64", None, False),
    ({}, "darwin", "arm64", None, False),
    ({}, "win32", "AMD64", None, False),
    ({"SIMPSONS_JAX_CPU_KERNELS": "0"}, "linux", "x86_64", None, False),
    ({"SIMPSONS_JAX_CPU_KERNELS": "1"}, "linux", "x86_64", "nvidiactl", True),
  ],
)
def test_the_cpu_kernels_are_built_only_where_they_run(
  tmp_path, environ, system, machine, device, built
):
  if device:
    (tmp_path / device).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / device).touch()
  build, why = dependencies.cpu_kernels(environ, system, machine, str(tmp_path))
  assert build == built
  assert why and (device is None or built or device in why)


def test_a_wrong_kernel_setting_is_one_sentence():
  with pytest.raises(ValueError, match="set it to 1 or 0"):
    dependencies.cpu_kernels({"SIMPSONS_JAX_CPU_KERNELS": "yes"}, "linux", "x86_64")
