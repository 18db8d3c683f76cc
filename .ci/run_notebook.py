"""Runs the Colab/Kaggle notebook's code cells in order, from this checkout.

  python .ci/run_notebook.py

As *Run all* would on a runtime without Colab: the install cell installs the
checkout (`pip install -e .`), the training, evaluation, picture and predict
cells run the demo config at a tiny size (OVERRIDES, set after the settings
cell, as a user's edit would be). The TensorBoard magics (`%` lines) need a
notebook frontend and are left out. Any failing cell stops the run (exit 1);
the run's folder is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"
OVERRIDES = {
  "CONFIG": "configs/demo.py",
  "RUN_NAME": "ci_notebook",
  "EXTRA_FLAGS": "--config.train.num_epochs=1 "
  "--config.data.synthetic_per_character=24 --config.data.min_images=10 "
  "--config.data.image_size=32 --config.train.batch_size=16 "
  "'--config.model.simpsons_cnn.dense_features=(64,)'",
}


def main() -> int:
  os.chdir(ROOT)
  cells = json.loads(NOTEBOOK.read_text())["cells"]
  namespace: dict = {"__name__": "__main__"}
  try:
    for index, cell in enumerate(cells):
      if cell["cell_type"] != "code":
        continue
      source = "".join(cell["source"])
      python = "\n".join(
        line for line in source.splitlines() if not line.lstrip().startswith("%")
      )
      print(f"--- cell {index}", flush=True)
      exec(compile(python, f"{NOTEBOOK.name}, cell {index}", "exec"), namespace)
      if "REPO_URL =" in source:
        namespace.update(OVERRIDES)
  except Exception:  # noqa: BLE001 - reported as the cell's failure.
    traceback.print_exc()
    return 1
  finally:
    shutil.rmtree(ROOT / "runs" / OVERRIDES["RUN_NAME"], ignore_errors=True)
  print("Every code cell ran.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
