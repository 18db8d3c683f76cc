"""The keys of a config file, and what is wrong with the `--config` of a
command line: a file that is not there or does not parse, and the
`--config.KEY=...` it lacks, with the closest keys it has (one-line errors)."""

from __future__ import annotations

import difflib
import importlib.util
import os
from types import ModuleType
from typing import Any

from simpsons_jax import config_upgrade, errors


def keys(config: Any, prefix: str = "") -> list[str]:
  """Every key of a ConfigDict, nested ones as 'group.key'."""
  found = []
  for name, value in config.items():
    found.append(prefix + name)
    if hasattr(value, "items") and not isinstance(value, dict):
      found += keys(value, f"{prefix}{name}.")
  return found


def lookup(config: Any, key: str) -> Any:
  """`config`'s value at a dotted key ('data.image_size'); None where a group
  or the key is absent (e.g. another model's settings in an older config)."""
  for part in key.split("."):
    if part not in config:
      return None
    config = config[part]
  return config


def load_config_file(path: str) -> ModuleType:
  """The module of a config file (its `get_config()` gives the config)."""
  spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class ConfigFileError(errors.UserError):
  """The `--config` file is not there or not a file."""


def config_path(argv: list[str]) -> str:
  """The `--config` file of a command line ('' when there is none), without
  ml_collections' `:ARGS` suffix."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  if not path and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  return path.split(":")[0]


def check_config_file(argv: list[str]) -> None:
  """ConfigFileError when the command line's `--config` names no file (absl
  would defer the error and raise it, chained, at first use)."""
  path = config_path(argv)
  if not path or os.path.isfile(path):
    return
  folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
  shipped = (
    sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
    if os.path.isdir(folder)
    else []
  )
  there = f"; {folder} holds {', '.join(shipped)}" if shipped else ""
  what = "is a folder" if os.path.isdir(path) else "does not exist"
  raise ConfigFileError(
    f"--config={path} {what}: give a config file, e.g. configs/demo.py{there}"
  )


def syntax_error(error: SyntaxError) -> str:
  """A config file that does not parse, as one sentence naming its line."""
  where = f"{error.filename}, line {error.lineno}" if error.lineno else error.filename
  text = f": {error.text.strip()}" if error.text and error.text.strip() else ""
  return f"--config={error.filename}: {error.msg} ({where}{text}): fix the file"


def unknown_override(argv: list[str]) -> str:
  """Which `--config.KEY=...` of `argv` the `--config` file lacks, and its
  closest keys, as one sentence."""
  path = config_path(argv)
  config = load_config_file(path).get_config()
  known = sorted(keys(config))
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      key = arg[len("--config.") :].split("=", 1)[0]
      moved = config_upgrade.new_key(key, config.model.name)
      if key not in known and moved:
        return (
          f"--config.{key} is now --config.{moved} (the "
          f"config is nested since December 2026; configs/default.py lists every key)"
        )
      if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = (
          f"did you mean {', '.join(f'--config.{k}' for k in close)}? " if close else ""
        )
        return (
          f"--config.{key} is not a key of {path}: {hint}"
          "configs/default.py lists every key, with its meaning"
        )
  return f"a --config.KEY override does not match {path}'s keys"
