"""Which listed files are usable images, checked once, before any training.

A file is usable when its name is valid UTF-8, it can be read, its header is
a JPEG or PNG of at most `max_pixels` pixels (read before anything is
decoded), and TensorFlow's decoder, the one training uses, decodes it in
full. Each verdict is kept with the file's size, modification time and
SHA-256 in `file_checks.json`, so a resumed run checks only new or changed
files, and the content hashes find exact duplicates. Unusable files are
skipped, counted by reason, logged once and listed in `skipped_files.json`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
from absl import logging
from etils import epath
from PIL import Image

from simpsons_jax import files

SKIPPED_FILENAME = "skipped_files.json"
CHECKS_FILENAME = "file_checks.json"
# Larger than a 48-megapixel phone photo; a decoded image of this many
# pixels takes 300 MB.
DEFAULT_MAX_PIXELS = 100_000_000
_CHECKS_FORMAT = 1
# The pixel limit is ours (checked from the header, before decoding).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode(contents: tf.Tensor) -> tf.Tensor:
  """A JPEG or PNG of any mode as uint8 RGB (height, width, 3)."""
  return tf.io.decode_image(
    contents, channels=3, dtype=tf.uint8, expand_animations=False
  )


def read_header(contents: bytes, max_pixels: int) -> tuple[str | None, int]:
  """Why the header of `contents` is not a JPEG or PNG within the pixel limit
  (None when it is), and the pixel count it claims (0 when unreadable). Only
  the header is read."""
  try:
    with Image.open(io.BytesIO(contents)) as image:
      kind, (width, height) = image.format, image.size
  except Image.DecompressionBombError:
    limit = 2 * Image.MAX_IMAGE_PIXELS
    return f"over the pixel limit (the header claims more than {limit:,} pixels)", 0
  except (OSError, SyntaxError, ValueError) as e:
    why = str(e).split(" <")[0] or type(e).__name__
    return f"not a readable JPEG or PNG ({why})", 0
  if kind not in ("JPEG", "PNG"):
    return f"a {kind} image, not a JPEG or PNG", width * height
  if width * height > max_pixels:
    return (
      f"over the pixel limit ({width}x{height} pixels, more than "
      f"max_image_pixels={max_pixels:,})"
    ), width * height
  return None, width * height


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What the check of one file found: why it is unusable (None: usable) and
  the SHA-256 of its bytes ('' when unreadable)."""

  reason: str | None
  sha256: str = ""


def read_image(
  path: epath.Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Verdict, Any]:
  """Reads, hashes, inspects and decodes one file: its verdict and the decoded
  uint8 RGB image (None when unusable)."""
  problem = files.name_problem(path) or files.kind_problem(path)
  if problem:
    return Verdict(problem), None
  try:
    with files.as_path(path).open("rb") as f:
      contents = f.read()
  except OSError as e:
    return Verdict(f"unreadable ({e.strerror or e})"), None
  except tf.errors.OpError as e:  # Through tf.io.gfile (gs://).
    return Verdict(f"unreadable ({e.message})"), None
  if not contents:
    return Verdict("empty file"), None
  problem, image = decode_checked(contents, max_pixels)
  return Verdict(problem, hashlib.sha256(contents).hexdigest()), image


def decode_checked(
  contents: bytes, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[str | None, Any]:
  """Why a file's bytes are not a usable image (header, pixel limit, full
  decode), or None and the decoded uint8 RGB image."""
  problem, _ = read_header(contents, max_pixels)
  if problem:
    return problem, None
  try:
    return None, decode(contents)
  except tf.errors.OpError as e:
    return (
      f"not a readable JPEG or PNG (TensorFlow: {e.message.split(' [Op:')[0]})",
      None,
    )


def _stamp(path: epath.Path) -> list[int] | None:
  """Size and modification time (ns where local, s on object stores)."""
  try:
    if files.is_local(path):
      stat = os.stat(path)
      return [stat.st_size, stat.st_mtime_ns]
    stat = path.stat()
  except (OSError, tf.errors.OpError):
    return None
  return [stat.length, stat.mtime]


def _key(path: epath.Path) -> str:
  return os.fsdecode(path.absolute() if files.is_local(path) else path)


class _VerdictCache:
  """Verdicts kept in a JSON file, valid while a file's size and mtime hold."""

  def __init__(self, path: epath.Path | None, max_pixels: int):
    self.path, self.max_pixels = path, max_pixels
    self.entries: dict[str, list] = {}
    if path is not None and path.exists():
      try:
        saved = json.loads(path.read_text())
        if saved.get("format") == _CHECKS_FORMAT and saved["max_pixels"] == max_pixels:
          self.entries = saved["files"]
      except (ValueError, KeyError, TypeError, AttributeError):
        logging.warning("%s is unreadable; all files are checked again.", path)

  def verdicts(self, paths: list[epath.Path]) -> dict[epath.Path, Verdict]:
    found, todo = {}, []
    for path in paths:
      key, stamp = _key(path), _stamp(path)
      entry = self.entries.get(key)
      if stamp is not None and entry is not None and entry[:2] == stamp:
        found[path] = Verdict(entry[3], entry[2])
      else:
        todo.append(path)
    if todo:
      with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        checked = pool.map(lambda p: read_image(p, self.max_pixels)[0], todo)
        for path, verdict in zip(todo, checked, strict=True):
          found[path] = verdict
          stamp = _stamp(path)
          if stamp is not None and files.name_problem(path) is None:
            key = _key(path)
            self.entries[key] = [*stamp, verdict.sha256, verdict.reason]
      if self.path is not None:
        data = {"format": _CHECKS_FORMAT, "max_pixels": self.max_pixels}
        data["files"] = self.entries
        files.write_text_atomic(self.path, json.dumps(data) + "\n")
    return found


@dataclasses.dataclass(frozen=True)
class UsableImages:
  """The usable images per character and the SHA-256 of each."""

  images: dict[str, list[epath.Path]]
  sha256: dict[epath.Path, str]


def keep_usable(
  images: Mapping[str, list[epath.Path]],
  report_dir: str | os.PathLike | None,
  max_pixels: int = DEFAULT_MAX_PIXELS,
) -> UsableImages:
  """Keeps the usable images of each character; reports the others.

  The skipped files and their reasons go to `<report_dir>/skipped_files.json`,
  the verdicts to `<report_dir>/file_checks.json` (None: nothing is written).
  """
  paths = [p for files in images.values() for p in files]
  cache = None
  if report_dir is not None:
    report_dir = files.as_path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    cache = report_dir / CHECKS_FILENAME
  verdicts = _VerdictCache(cache, max_pixels).verdicts(paths)
  skipped = {os.fsdecode(p): v.reason for p, v in verdicts.items() if v.reason}
  if report_dir is not None:
    report = report_dir / SKIPPED_FILENAME
    files.write_text_atomic(report, json.dumps(skipped, indent=2) + "\n")
  if skipped:
    by_reason = collections.Counter(r.split(" (")[0] for r in skipped.values())
    first = next(iter(skipped.items()))
    logging.warning(
      "Skipped %d of %d image files (%s)%s. First: %r: %s",
      len(skipped),
      len(paths),
      ", ".join(f"{n} {r}" for r, n in by_reason.most_common()),
      f"; the list is in {report}" if report_dir is not None else "",
      *first,
    )
  usable = {
    name: [p for p in files if not verdicts[p].reason] for name, files in images.items()
  }
  return UsableImages(
    usable, {p: v.sha256 for p, v in verdicts.items() if not v.reason}
  )
