"""Writing files that another process may be reading."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename.

  Readers see the old content or the new one, never half of it; this matters
  when several processes of one run share the workdir. The file is flushed to
  disk before the rename and the folder after it, so that a power loss leaves
  the old file or the new one, never an empty one.
  """
  path = Path(path)
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(temporary, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)
  _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
  """Flushes a folder's entries (the rename) to disk, where the OS allows it."""
  try:
    descriptor = os.open(folder, os.O_RDONLY)
  except OSError:  # Windows cannot open folders.
    return
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


class DamagedFileError(ValueError):
  """A file of the workdir cannot be read back; the message names it."""


def read_json(path: str | os.PathLike, fix: str) -> Any:
  """The JSON value in `path`; a damaged file is one error naming it and `fix`."""
  path = Path(path)
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise DamagedFileError(f"{path} is damaged ({e}): {fix}") from e
