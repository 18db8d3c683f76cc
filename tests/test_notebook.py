"""The Colab/Kaggle notebook: valid, loud on failure (.ci/run_notebook.py runs it)."""

import contextlib
import json
import re
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


def _install_cell() -> str:
  (cell,) = [
    "".join(c["source"])
    for c in _cells()
    if c["cell_type"] == "code" and "def run(" in "".join(c["source"])
  ]
  return cell


def test_the_install_cell_stops_loudly(tmp_path, monkeypatch):
  # (.ci/run_notebook.py runs every cell, the install included, on the checkout.)
  monkeypatch.chdir(tmp_path)  # Not a checkout, and no REPO_URL set:
  with pytest.raises(RuntimeError, match="Set REPO_URL in the settings cell"):
    exec(_install_cell(), {"REPO_URL": ""})
  # A failing command stops the cell, not the next one.
  namespace = {"REPO_URL": ""}
  with contextlib.suppress(RuntimeError):
    exec(_install_cell(), namespace)
  with pytest.raises(RuntimeError, match=r"exit code 3\): exit 3"):
    namespace["run"]("exit 3")


def test_the_notebook_runs_main_py_in_its_modes():
  commands = re.findall(
    r'main_py\(f"([^"]*)"\)',
    "".join("".join(c["source"]) for c in _cells() if c["cell_type"] == "code"),
  )
  modes = [re.search(r"--mode=(\w+)", c) for c in commands]
  assert [m[1] if m else "train" for m in modes] == [
    "train",
    "evaluate",
    "evaluate",
    "show_data",
    "predict",
  ]
