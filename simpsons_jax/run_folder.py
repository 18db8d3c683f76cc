"""A run's folder: one training process at a time, and runs it can continue.

`lock` keeps a second training process out of a workdir for the life of the
first (the operating system drops the lock when its holder exits, however it
dies); object stores (`gs://`) have no locks, and there the workdir is not
locked. `prepare` refuses a config that cannot continue the run already there,
or with `restart=True` moves that run to `<workdir>/archive/<time>/`; a run
that was itself started by `restart=True` is resumed by the same command,
never discarded by it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from simpsons_jax import checkpointing, config_keys, errors, files, models

try:
  import fcntl

  msvcrt = None
except ImportError:  # Windows.
  import msvcrt

  fcntl = None

LOCK_FILENAME = "train.lock"
# What a resumed run must share with the run it continues: they fix the
# labels, the split, the data order or the shapes of the saved arrays; so do
# the model's settings that fix its parameter shapes (`resume_fixed`).
RESUME_FIXED = (
  "data.source",
  "data.min_images",
  "data.negatives",
  "data.image_size",
  "data.val_fraction",
  "data.train_fraction",
  "seed",
  "train.batch_size",
  "data.synthetic_per_character",
  "model.name",
  "optim.name",
  "optim.schedule",
  "optim.ema_decay",
)


def resume_fixed(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The keys ('group.key') a run continuing `config`'s must keep."""
  return RESUME_FIXED + models.fixed_settings(config)


# What `restart` moves aside; synthetic data and the file checks are kept.
RUN_FILES = (
  "checkpoints",
  "tensorboard",
  "eval",
  "export",
  "characters.json",
  "config.json",
  "split.json",
  "skipped_files.json",
)


class WorkdirBusy(errors.UserError):
  """Another training process holds the workdir."""


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds `<workdir>/train.lock` until the block exits.

  Raises WorkdirBusy, naming the holder, when another process holds it.
  """
  workdir = files.as_path(workdir)
  created = not workdir.exists()
  if not created and not workdir.is_dir():
    raise errors.UserError(
      f"--workdir={workdir} is a file, not a folder: give a folder for the run "
      "(it is created if missing)"
    )
  workdir.mkdir(parents=True, exist_ok=True)
  if not files.is_local(workdir):
    logging.warning(
      "%s is not on a local disk and has no file locks: it is not locked, so "
      "start one training run per workdir.",
      workdir,
    )
    yield
    return
  path = workdir / LOCK_FILENAME
  descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  held = False
  try:
    try:
      if not _take(descriptor):
        os.lseek(descriptor, 0, os.SEEK_SET)
        holder = os.read(descriptor, 1000).decode(errors="replace").strip()
        raise WorkdirBusy(
          f"{workdir} is in use by another training run ({holder or 'unknown'}): "
          "wait for it or stop it, or train in another --workdir. evaluate and "
          "predict can run beside it."
        )
    except OSError as e:  # A file system without locks (some network ones).
      logging.warning("Could not lock %s (%s); going on without.", path, e)
    if not path.exists() or os.fstat(descriptor).st_ino != os.stat(path).st_ino:
      # Locked a file that a run ending just now removed (below): its
      # successor, or a third process, owns the path.
      raise WorkdirBusy(f"{workdir} changed hands while starting: start again.")
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.write(
      descriptor,
      f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(),
    )
    held = True
    yield
  finally:
    # A run that failed before writing anything leaves no trace of itself
    # (and a process refused here leaves the holder's lock file alone).
    trace_only = held and [p.name for p in workdir.iterdir()] == [LOCK_FILENAME]
    if trace_only and fcntl is not None:
      # Removed while locked: a process that locks it now sees it gone.
      path.unlink()
    os.close(descriptor)  # Releases the lock.
    if trace_only:
      # Windows removes no file another process holds open: after closing.
      with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
        if created:
          workdir.rmdir()


# Windows locks byte ranges, and no other process can read a locked range:
# the byte locked lies far past the holder's line that WorkdirBusy quotes.
_WINDOWS_LOCKED_BYTE = 1 << 30


def _take(descriptor: int) -> bool:
  """Locks the open lock file; False if another process holds it."""
  if fcntl is not None:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return False
    return True
  os.lseek(descriptor, _WINDOWS_LOCKED_BYTE, os.SEEK_SET)
  try:
    msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
  except OSError as e:
    if e.errno in (errno.EACCES, errno.EDEADLOCK):
      return False
    raise
  return True


def _setting(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value at a dotted key, sequences as lists (JSON gives lists)."""
  value = config_keys.lookup(config, key)
  return list(value) if isinstance(value, list | tuple) else value


def _archive(workdir: epath.Path, existing: list[epath.Path]) -> None:
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
  archive = workdir / "archive" / stamp
  archive.mkdir(parents=True)
  for path in existing:
    files.move(path, archive / path.name)
  logging.warning("restart=True: the previous run was moved to %s.", archive)


def prepare(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Makes sure `workdir` can take this run; see the module docstring."""
  workdir.mkdir(parents=True, exist_ok=True)
  existing = [workdir / name for name in RUN_FILES if (workdir / name).exists()]
  saved = None
  if (workdir / checkpointing.CONFIG_FILENAME).exists():
    saved = checkpointing.load_config(workdir)
  started_by_restart = saved is not None and saved.restart
  if config.restart and existing and not started_by_restart:
    _archive(workdir, existing)
    return
  if saved is None:
    return
  if config.restart:
    logging.warning(
      "restart=True, but the run in %s was itself started by restart=True: "
      "this is taken as that command run again, and the run is resumed, not "
      "discarded. To start afresh once more, move %s away.",
      workdir,
      workdir,
    )
  pairs = {
    key: (_setting(saved, key), _setting(config, key)) for key in resume_fixed(config)
  }
  changed = [
    f"{key}: {old!r} -> {new!r}" for key, (old, new) in pairs.items() if old != new
  ]
  if not changed:
    return
  if started_by_restart:
    fix = (
      f"Use another --workdir or the old settings; restart=True does not "
      f"discard a run it started itself (rerunning its command would), so move "
      f"{workdir} away to start afresh there."
    )
  else:
    fix = (
      "Use another --workdir, the old settings, or --config.restart=True to "
      "move the old run to <workdir>/archive/ and start afresh."
    )
  raise errors.UserError(
    f"{workdir} holds a run this config cannot continue ({'; '.join(changed)}). " + fix
  )
