"""Reading an export folder safely, without simpsons_jax: model.json lists every
file of the export with its size and SHA-256; a folder that holds other files,
or lacks one, mixes two exports or was cut short, and is refused."""

import hashlib
import json
from pathlib import Path


def checked_card(folder: Path) -> dict:
  """model.json of `folder`, once its files are exactly those it lists."""
  card = json.loads((folder / "model.json").read_text())
  found = {
    p.relative_to(folder).as_posix(): p
    for p in folder.rglob("*")
    if p.is_file() and p.name != "model.json"
  }
  listed = card.get("files", {})
  for name in sorted(set(found) | set(listed)):
    data = found[name].read_bytes() if name in found else None
    entry = listed.get(name)
    if (
      data is None
      or entry is None
      or entry["sha256"] != hashlib.sha256(data).hexdigest()
    ):
      raise SystemExit(
        f"{folder}: {name} does not match model.json (a mixed or unfinished "
        "export): export the run again"
      )
  return card
