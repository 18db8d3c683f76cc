"""Paths on any file system, and writing files another process may be reading.

Workdirs and data may live on a local disk or on an object store (`gs://` on
Cloud TPU VMs and pods, whose hosts share no disk): `as_path` gives an
`etils.epath.Path` for either, which reaches `gs://` through `tf.io.gfile`.
What only a local disk offers (file locks, fsync, atomic renames) is used where
`is_local`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from etils import epath

from simpsons_jax import errors


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
  """`write_bytes_atomic` of `text` in UTF-8."""
  write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename.

  Readers see the old content or the new one, never half of it; this matters
  when several processes of one run share the workdir. The file is flushed to
  disk before the rename and the folder after it, so that a power loss leaves
  the old file or the new one, never an empty one. On an object store the
  object is written whole, which readers see whole too.
  """
  path = as_path(path)
  if not is_local(path):  # An object store replaces an object whole.
    path.write_bytes(data)
    return
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(temporary, "wb") as f:
    f.write(data)
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


@contextlib.contextmanager
def folder_written_whole(target: str | os.PathLike) -> Iterator[epath.Path]:
  """Yields a new temporary folder beside `target` to write into; when the
  block ends without an exception it replaces `target` whole (whatever
  `target` held before is gone), else it is removed and `target` is left as
  it was. Readers see the old folder or the new one, never a mix, nor a half.

  On a local disk the swap is two renames; on an object store, which has no
  folders to rename, the old objects are removed and the new ones moved in.
  """
  target = as_path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  temporary = target.parent / f".{target.name}.{os.getpid()}.tmp"
  if temporary.exists():
    temporary.rmtree()
  temporary.mkdir()
  try:
    yield temporary
  except BaseException:
    temporary.rmtree(missing_ok=True)
    raise
  if not is_local(target):
    if target.exists():
      target.rmtree()
    move(temporary, target)
    return
  old = target.parent / f".{target.name}.{os.getpid()}.old"
  if target.exists():
    os.replace(target, old)
  os.replace(temporary, target)
  _fsync_folder(target.parent)
  if old.exists():
    old.rmtree()


class UnwritablePath(errors.UserError):
  """A folder the user named cannot be written; the message says which and how
  to choose another."""


def check_writable(folder: str | os.PathLike, choose: str) -> epath.Path:
  """Creates `folder` if needed and writes and removes a file in it, before
  any long work whose results would go there; `choose` names the way out
  (e.g. 'give --output_dir a folder you can write to')."""
  folder = as_path(folder)
  probe = folder / f".write-check.{os.getpid()}"
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UnwritablePath(
      f"cannot write to {folder} ({describe_os_error(e)}): {choose}"
    ) from e
  return folder


def describe_os_error(error: OSError) -> str:
  """An OSError in words, without Python's decoration: 'Permission denied',
  'No space left on device'."""
  return error.strerror or errno.errorcode.get(error.errno or 0, "") or str(error)


class DamagedFileError(errors.UserError):
  """A file of the workdir cannot be read back; the message names it."""


def read_json(path: str | os.PathLike, fix: str) -> Any:
  """The JSON value in `path`; a damaged file is one error naming it and `fix`."""
  path = as_path(path)
  if problem := kind_problem(path):
    raise DamagedFileError(f"{path} is {problem}: {fix}")
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise DamagedFileError(f"{path} is damaged ({e}): {fix}") from e


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
  """The device and inode of an existing local file (through links)."""
  if not is_local(path):
    return None
  try:
    found = os.stat(path)
  except OSError:
    return None
  return found.st_dev, found.st_ino


def refuse_writing_inputs(
  outputs: Mapping[str, str | os.PathLike | None],
  inputs: Iterable[str | os.PathLike],
) -> None:
  """Before anything is opened for writing: UserError when a file to be
  written is one of `inputs`, or two are one file. `outputs` maps what names
  each (a flag, or a sentence) to the file ('' or None: nothing written).

  One file is recognised however it is named: another spelling, a symbolic
  link, a hard link (the same device and inode), or, for a file not there
  yet, the same resolved path."""
  read = {}
  for path in inputs:
    if (identity := _identity(path)) is not None:
      read.setdefault(identity, path)
  seen: dict[Any, str] = {}
  for what, path in outputs.items():
    if not path:
      continue
    identity = _identity(path)
    if identity in read:
      raise errors.UserError(
        f"{what}={os.fsdecode(path)} is also an input ({os.fsdecode(read[identity])}): "
        "writing it would destroy that file; choose another name (nothing was "
        "written)"
      )
    key = identity or os.path.realpath(path)
    if key in seen:
      raise errors.UserError(
        f"{what} and {seen[key]} name the same file ({os.fsdecode(path)}): "
        "give each its own (nothing was written)"
      )
    seen[key] = what


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
  """Whether `path` lies in `folder` (or is it), links resolved."""
  real, base = os.path.realpath(path), os.path.realpath(folder)
  return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def kind_problem(path: str | os.PathLike) -> str | None:
  """Why `path` is not read as a file: a named pipe (FIFO), a socket or a
  device would block a reader forever or never end. None for a regular file
  (through links), a path that does not exist (its reader says so) and paths
  on an object store."""
  if not is_local(path):
    return None
  try:
    mode = os.stat(path).st_mode
  except OSError:
    return None
  if stat.S_ISREG(mode):
    return None
  if stat.S_ISDIR(mode):
    return "a folder, not a file"
  kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket"
  if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
    kind = "a device"
  return f"{kind}, not a regular file (only regular files are read)"


def name_problem(path: epath.Path) -> str | None:
  """Why a file or folder name cannot be used, or None."""
  try:
    os.fsdecode(path).encode("utf-8")
  except UnicodeEncodeError:
    return "name is not valid UTF-8 (rename it)"
  return None
