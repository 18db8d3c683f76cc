"""One training process per workdir, and restart=True that acts only once."""

import json
import os
import signal
import subprocess
import sys

import pytest

from simpsons_jax import checkpointing, run_folder, train

HOLD = """
import sys, time
from simpsons_jax import run_folder
with run_folder.lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_a_second_process_is_refused_until_the_first_dies(tmp_path, tiny_config):
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    busy = pytest.raises(run_folder.WorkdirBusy, match=f"pid {holder.pid} on ")
    with busy, run_folder.lock(tmp_path):
      pass
    with pytest.raises(run_folder.WorkdirBusy, match="in use by another training"):
      train.train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "config.json").exists()
  finally:
    holder.send_signal(signal.SIGKILL)  # Dies without any clean-up.
    holder.wait()
  with run_folder.lock(tmp_path):  # A dead holder's lock is no lock.
    assert f"pid {os.getpid()} " in (tmp_path / "train.lock").read_text()


# Windows' msvcrt.locking (byte ranges, EACCES when held), played by POSIX
# record locks: the lock's Windows code path, run here.
AS_ON_WINDOWS = """
import errno, fcntl, os, sys, types
from simpsons_jax import checkpointing, files, models  # Before msvcrt appears.
def locking(descriptor, mode, count):
  start = os.lseek(descriptor, 0, os.SEEK_CUR)
  try:
    fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, count, start)
  except BlockingIOError:
    raise OSError(errno.EACCES, "Permission denied") from None
sys.modules["msvcrt"] = types.SimpleNamespace(locking=locking, LK_NBLCK=2)
sys.modules["fcntl"] = None  # import fcntl fails, as on Windows.
"""
TRY = """
import sys
from simpsons_jax import run_folder
try:
  with run_folder.lock(sys.argv[1]):
    print("locked", flush=True)
except run_folder.WorkdirBusy as e:
  print(e)
"""


@pytest.mark.slow
def test_the_lock_holds_on_windows_too(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", AS_ON_WINDOWS + HOLD, str(tmp_path)],
    stdout=subprocess.PIPE,
    text=True,
  )

  def second() -> str:
    command = [sys.executable, "-c", AS_ON_WINDOWS + TRY, str(tmp_path)]
    return subprocess.run(command, capture_output=True, text=True).stdout

  try:
    assert holder.stdout.readline().strip() == "locked"
    assert f"in use by another training run (pid {holder.pid} on " in second()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert second().strip() == "locked"
  assert not list(tmp_path.iterdir())  # Nothing written: no trace left.


def test_the_lock_is_released_on_an_error(tmp_path):
  with pytest.raises(ZeroDivisionError), run_folder.lock(tmp_path):
    raise ZeroDivisionError
  with run_folder.lock(tmp_path):
    pass


def _saved_run(workdir, config):
  workdir.mkdir(parents=True, exist_ok=True)
  checkpointing.save_config(workdir, config)
  (workdir / "checkpoints").mkdir()
  (workdir / "checkpoints" / "marker").write_text("the run's checkpoints")


def test_restart_acts_once_and_the_same_command_then_resumes(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  _saved_run(workdir, tiny_config)  # A run started without restart.
  (workdir / "export" / "8").mkdir(parents=True)  # Its export goes with it.
  tiny_config.restart = True
  run_folder.prepare(tiny_config, workdir)
  (archived,) = (workdir / "archive").iterdir()
  assert (archived / "export" / "8").is_dir() and not (workdir / "export").exists()
  _saved_run(workdir, tiny_config)  # The new run, started by restart=True.
  run_folder.prepare(tiny_config, workdir)  # The same command again: resume.
  assert (workdir / "checkpoints" / "marker").exists()
  assert len(list((workdir / "archive").iterdir())) == 1
  tiny_config.data.image_size = 48  # It cannot continue: say how to start afresh.
  with pytest.raises(ValueError, match="move .* away to start afresh"):
    run_folder.prepare(tiny_config, workdir)


def test_restart_after_a_run_resumed_without_it_acts_again(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  _saved_run(workdir, tiny_config)
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["restart"] is False
  tiny_config.restart = True
  run_folder.prepare(tiny_config, workdir)
  assert not (workdir / "checkpoints").exists()


def test_a_run_that_fails_before_writing_anything_leaves_no_trace(tmp_path):
  created = tmp_path / "new"
  with pytest.raises(RuntimeError), run_folder.lock(created):
    raise RuntimeError("no such data set")
  assert not created.exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  with pytest.raises(RuntimeError), run_folder.lock(existing):
    raise RuntimeError("no such data set")
  assert existing.is_dir() and not any(existing.iterdir())
  with run_folder.lock(existing):  # A run that wrote something keeps its lock file.
    (existing / "config.json").write_text("{}")
  assert (existing / run_folder.LOCK_FILENAME).exists()
