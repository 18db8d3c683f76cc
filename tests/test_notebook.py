"""The Colab/Kaggle notebook: valid, and its commands run on CPU offline."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"


def _cells():
  notebook = json.loads(NOTEBOOK.read_text())
  assert notebook["nbformat"] == 4
  for cell in notebook["cells"]:
    assert cell["cell_type"] in ("markdown", "code")
    assert all(isinstance(line, str) for line in cell["source"])
  return notebook["cells"]


def test_code_cells_are_valid_python_apart_from_shell_and_magic_lines():
  for cell in _cells():
    if cell["cell_type"] == "code":
      source = "".join(cell["source"])
      python = re.sub(r"(?m)^(\s*)[!%].*$", r"\1pass", source)
      compile(python, str(NOTEBOOK), "exec")


def test_notebook_commands_run_on_cpu_with_a_tiny_config(tmp_path):
  commands = [
    line.strip()[1:]
    for cell in _cells()
    if cell["cell_type"] == "code"
    for line in "".join(cell["source"]).splitlines()
    if line.strip().startswith("!python main.py")
  ]
  modes = [re.search(r"--mode=(\w+)", c) for c in commands]
  assert [m[1] if m else "train" for m in modes] == [
    "train",
    "evaluate",
    "evaluate",
    "show_data",
    "predict",
  ]
  workdir = tmp_path / "run"
  values = {
    "CONFIG": "configs/demo.py",
    "WORKDIR": str(workdir),
    "DATA_FLAGS": "",
    "EXTRA_FLAGS": "--config.num_epochs=1 --config.synthetic_images_per_character=24 "
    "--config.min_images=10 "
    "--config.image_size=32 --config.batch_size=16 --config.dense_features=(64,)",
    "TEST_DIR": str(workdir / "synthetic_data"),
    "IMAGES": str(workdir / "synthetic_data" / "clown" / "pic_0003.jpg"),
  }
  for command in commands:
    line = re.sub(r"\{(\w+)\}", lambda m: values[m[1]], command)
    argv = [sys.executable if a == "python" else a for a in shlex.split(line)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode:
      pytest.fail(f"{line} failed:\n{result.stderr[-3000:]}")
  assert json.loads((workdir / "eval" / "validation" / "report.json").read_text())
  assert (workdir / "eval" / "synthetic_data" / "report.json").exists()
  assert (workdir / "eval" / "training_data" / "random_characters.png").exists()
  assert "pic_0003.jpg: " in result.stdout
