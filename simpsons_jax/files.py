"""Paths on any file system, and writing files another process may be reading.

Workdirs and data may live on a local disk or on an object store (`gs://` on
Cloud TPU VMs and pods, whose hosts share no disk): `as_path` gives an
`etils.epath.Path` for either, which reaches `gs://` through `tf.io.gfile`.
What only a local disk offers (file locks, fsync, atomic renames) is used where
`is_local`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` is on a local file system (no `scheme://` prefix)."""
  return "://" not in os.fspath(path)


def as_path(location: str | os.PathLike) -> epath.Path:
  """`location` as a path on its file system, `~` expanded where local."""
  text = os.fspath(location)
  return epath.Path(os.path.expanduser(text) if is_local(text) else text)


def move(source: epath.Path, target: epath.Path) -> None:
  """Moves a file or a folder tree to `target` on the same file system.

  Object stores have no folders to rename: there each file is moved.
  """
  if is_local(source) or not source.is_dir():
    source.rename(target)
    return
  for folder, _, names in source.walk():
    relative = folder.relative_to(source)
    (target / relative).mkdir(parents=True, exist_ok=True)
    for name in names:
      (folder / name).rename(target / relative / name)
  source.rmtree()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename.

  Readers see the old content or the new one, never half of it; this matters
  when several processes of one run share the workdir. The file is flushed to
  disk before the rename and the folder after it, so that a power loss leaves
  the old file or the new one, never an empty one. On an object store the
  object is written whole, which readers see whole too.
  """
  path = as_path(path)
  if not is_local(path):  # An object store replaces an object whole.
    path.write_text(text)
    return
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(temporary, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)
  _fsync_folder(path.parent)


def _fsync_folder(folder: epath.Path) -> None:
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
  path = as_path(path)
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise DamagedFileError(f"{path} is damaged ({e}): {fix}") from e
