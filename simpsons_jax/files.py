"""Writing files that another process may be reading."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename.

  Readers see the old content or the new one, never half of it; this matters
  when several processes of one run share the workdir.
  """
  path = Path(path)
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  temporary.write_text(text)
  os.replace(temporary, path)
