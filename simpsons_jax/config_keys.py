"""The keys of a config file, and which `--config.KEY=...` of a command line
it lacks, with the closest keys it has (for a one-line error)."""

from __future__ import annotations

import difflib
import importlib.util
from types import ModuleType
from typing import Any

from simpsons_jax import config_upgrade


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


def unknown_override(argv: list[str]) -> str:
  """Which `--config.KEY=...` of `argv` the `--config` file lacks, and its
  closest keys, as one sentence."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  if not path and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  config = load_config_file(path.split(":")[0]).get_config()
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
