"""Objects named in configs and registries as 'module:attribute'."""

from __future__ import annotations

import importlib
from typing import Any

from simpsons_jax import errors


def load(name: str, what: str = "") -> Any:
  """The attribute `name` ('package.module:Attribute') names, its module
  imported now; UserError naming `what` (e.g. 'evals.kaggle.type') when
  there is no such module or attribute."""
  module, _, attribute = name.partition(":")
  try:
    found = importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name is None or not module.startswith(e.name):
      raise  # A module it imports is missing: a bug or an install to fix.
    raise errors.UserError(
      f"{what or name}: no module {module!r} to import (is it on the Python path?)"
    ) from None
  if not attribute or not hasattr(found, attribute):
    raise errors.UserError(f"{what or name}: {module} has no {attribute!r}")
  return getattr(found, attribute)
