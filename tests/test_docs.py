"""The README and docs/ say only what the code does: every `main.py` flag and
`--config.KEY` they name exists, every repository path they name is there,
and their tables are those the results files render."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from absl import flags

from benchmarks import report
from simpsons_jax import config_keys

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Keys shown on purpose that no config has: a typo and an old flat key the
# errors table shows, and the settings of the model docs/extending.md adds.
NOT_KEYS = {"learning_rat", "data_dir", "model.tiny_conv.features"}
REPO_PATH = re.compile(r"(configs|benchmarks|examples|notebooks|\.ci)/[\w./-]+")


def shell_commands(text: str) -> list[str]:
  """Every command of the ```bash blocks of `text`, continuation lines joined
  and comments dropped."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for command in block.replace("\\\n", " ").splitlines():
      command = " ".join(command.split(" # ")[0].split())
      if command and not command.startswith("#"):
        commands.append(command)
  return commands


def _main_flags() -> set[str]:
  import main  # noqa: F401  (defines every mode's flags)

  return set(flags.FLAGS)


def _config_keys(config_file: str) -> set[str]:
  module = config_keys.load_config_file(str(ROOT / config_file))
  return set(config_keys.keys(module.get_config()))


def problems(text: str, main_flags: set[str]) -> list[str]:
  """What the commands of `text` name that does not exist."""
  found = []
  for command in shell_commands(text):
    try:
      words = shlex.split(command)
    except ValueError:  # A quote that spans lines (a remote command).
      words = command.split()
    runs_main = "main.py" in words
    config_file = next(
      (w.split("=", 1)[1] for w in words if w.startswith("--config=")),
      "configs/default.py",
    )
    if runs_main:
      if not (ROOT / config_file).exists():
        found.append(f"{config_file} does not exist: {command}")
        continue
      known = _config_keys(config_file)
    for word in words:
      name = word.split("=", 1)[0]
      if runs_main and name.startswith("--config."):
        if name[len("--config.") :] not in known | NOT_KEYS:
          found.append(f"{name} is not a key of {config_file}: {command}")
      elif runs_main and name.startswith("--") and name[2:] not in main_flags:
        found.append(f"{name} is not a main.py flag: {command}")
      elif REPO_PATH.fullmatch(word) and not (ROOT / word).exists():
        found.append(f"{word} does not exist: {command}")
  for key in re.findall(r"--config\.([a-z_][\w.]*[a-z_])", text):
    if key not in _config_keys("configs/default.py") | NOT_KEYS:
      found.append(f"--config.{key} is not a key of configs/default.py")
  return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_names_what_exists(doc):
  assert problems(doc.read_text(), _main_flags()) == []


COMMAND = (
  "python main.py --config=configs/demo.py --workdir=runs/demo "
  "--config.image_size=x --eval_directory=y configs/nothing.py"
)


def test_a_renamed_flag_or_key_is_caught():
  stale = (
    "```bash\npython main.py --config=configs/demo.py --workdir=runs/demo \\\n"
    "    --config.image_size=x --eval_directory=y configs/nothing.py\n```\n"
  )
  assert problems(stale, _main_flags()) == [
    f"--config.image_size is not a key of configs/demo.py: {COMMAND}",
    f"--eval_directory is not a main.py flag: {COMMAND}",
    f"configs/nothing.py does not exist: {COMMAND}",
    "--config.image_size is not a key of configs/default.py",
  ]


def test_every_link_to_a_file_of_the_repository_resolves():
  for doc in DOCS:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
      assert (doc.parent / target).exists(), f"{doc.name} links to {target}"


def test_the_readme_is_a_guide_of_at_most_300_lines():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= 300
  assert any(line.startswith("**Contents:**") for line in lines)


def test_the_tables_are_those_the_results_files_render():
  stale = [
    str(path.relative_to(ROOT))
    for path, text in report.rendered().items()
    if path.read_text() != text
  ]
  assert stale == [], "run python -m benchmarks.report"
