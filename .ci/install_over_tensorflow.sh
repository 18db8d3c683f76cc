#!/usr/bin/env bash
# An install on top of an existing TensorFlow, as on Colab and Kaggle, keeps
# that one: in a fresh virtual environment holding tensorflow 2.20, installing
# the project adds no second TensorFlow, `pip check` is clean and the demo's
# first epoch runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
pip="$scratch/venv/bin/pip --quiet --disable-pip-version-check"
$pip install tensorflow==2.20.0
$pip install -e .
$pip check
"$scratch/venv/bin/python" - <<'PY'
import importlib.metadata
import sys

sys.path.insert(0, "build_tools")
import dependencies

names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
found = sorted(names & set(dependencies.TENSORFLOW_DISTRIBUTIONS))
version = importlib.metadata.version("tensorflow")
assert found == ["tensorflow"] and version == "2.20.0", (found, version)
print(f"one TensorFlow: tensorflow {version}")
PY
"$scratch/venv/bin/python" main.py --config=configs/demo.py \
  --workdir="$scratch/demo" --config.train.num_epochs=1
