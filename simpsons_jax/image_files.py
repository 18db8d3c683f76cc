"""Which listed files are usable images, checked once before training.

The checks are quick: the file can be read, is not empty, its header parses
as a JPEG or PNG, and it is not cut short (a JPEG ends with its EOI marker, a
PNG with its IEND chunk); only files that fail the trailer check are decoded
in full to decide. Unusable files are skipped, counted by reason, logged once
and listed in `<workdir>/skipped_files.json`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from absl import logging
from PIL import Image

from simpsons_jax import files

SKIPPED_FILENAME = "skipped_files.json"
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


def check(path: Path) -> str | None:
  """Why `path` cannot be used as an image, or None when it can."""
  try:
    size = path.stat().st_size
    if size == 0:
      return "empty file"
    with open(path, "rb") as f:
      f.seek(max(0, size - 32))
      tail = f.read()
  except OSError as e:
    return f"unreadable ({e.strerror or e})"
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as image:
        kind = image.format
        if kind not in ("JPEG", "PNG"):
          return f"a {kind} image, not a JPEG or PNG"
        complete = (_JPEG_END if kind == "JPEG" else _PNG_END) in tail
        if not complete:
          image.load()  # Raises if the data is cut short.
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
    reason = str(e).split(" '")[0] or type(e).__name__
    return f"not a readable JPEG or PNG ({reason})"
  return None


def validate(
  images: Mapping[str, list[Path]], report_dir: str | os.PathLike
) -> dict[str, list[Path]]:
  """Keeps the usable images of each character; reports the others.

  The skipped files and their reasons go to `<report_dir>/skipped_files.json`.
  """
  paths = [p for files in images.values() for p in files]
  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    reasons = dict(zip(paths, pool.map(check, paths), strict=True))
  skipped = {str(p): reason for p, reason in reasons.items() if reason}
  report = Path(report_dir, SKIPPED_FILENAME)
  report.parent.mkdir(parents=True, exist_ok=True)
  files.write_text_atomic(report, json.dumps(skipped, indent=2) + "\n")
  if skipped:
    by_reason = collections.Counter(r.split(" (")[0] for r in skipped.values())
    logging.warning(
      "Skipped %d of %d image files (%s); the list is in %s. First: %s: %s",
      len(skipped),
      len(paths),
      ", ".join(f"{n} {r}" for r, n in by_reason.most_common()),
      report,
      *next(iter(skipped.items())),
    )
  return {name: [p for p in files if not reasons[p]] for name, files in images.items()}
