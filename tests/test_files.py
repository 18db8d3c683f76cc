"""Atomic writes: the new content is on disk before it replaces the old."""

import os
import stat

from simpsons_jax import files


def test_the_file_then_the_folder_are_flushed_around_the_rename(tmp_path, monkeypatch):
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(descriptor):
    kind = "folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"
    events.append(f"fsync {kind}")
    real_fsync(descriptor)

  def replace(source, target):
    events.append("rename")
    real_replace(source, target)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  target = tmp_path / "config.json"
  target.write_text("old\n")
  files.write_text_atomic(target, "new\n")
  assert events == ["fsync file", "rename", "fsync folder"]
  assert target.read_text() == "new\n"
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
