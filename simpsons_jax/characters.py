"""Which folders of a dataset are characters, their ids, and the JSON map.

A dataset is the Kaggle `simpsons_dataset` layout: one folder per character,
`<data_dir>/<character>/pic_NNNN.jpg`. Characters with at least `min_images`
pictures get ids in sorted name order; the map is saved as JSON in the workdir
and checked on every later run so that a changed folder never relabels a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence

from absl import logging
from etils import epath

from simpsons_jax import errors, files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MAP_FILENAME = "characters.json"
# Kaggle's test set: kaggle_simpson_testset/<character>_<N>.jpg.
_TEST_FILENAME = re.compile(r"^(?P<name>.+)_(?P<number>\d+)$")


class DatasetError(errors.UserError):
  """The data folder cannot be used as it is; the message says why and the fix."""


@dataclasses.dataclass(frozen=True)
class CharacterMap:
  """Character names in id order, with the image counts seen when scanned."""

  names: tuple[str, ...]
  counts: tuple[int, ...]

  @property
  def num_classes(self) -> int:
    return len(self.names)

  def index(self, name: str) -> int:
    return self.names.index(name)

  def save(self, path: str | os.PathLike) -> None:
    data = {"names": list(self.names), "counts": list(self.counts)}
    files.write_text_atomic(path, json.dumps(data, indent=2) + "\n")

  @classmethod
  def load(cls, path: str | os.PathLike) -> CharacterMap:
    """The map saved at `path`; a damaged file is an error naming it."""
    fix = (
      "restore it from a copy of the run (the checkpoints' metadata lists the "
      "characters in order), or start afresh with --config.restart=True."
    )
    data = files.read_json(path, fix)
    try:
      names, counts = data["names"], data["counts"]
      if not all(isinstance(n, str) for n in names) or len(names) != len(counts):
        raise ValueError("names must be strings, one count each")
      if not names or len(set(names)) != len(names):
        raise ValueError("names must be distinct, at least one")
      if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise ValueError("counts must be whole numbers")
    except (KeyError, TypeError, ValueError) as e:
      raise files.DamagedFileError(f"{path} is damaged ({e}): {fix}") from e
    return cls(names=tuple(names), counts=tuple(counts))


def resolve_data_dir(
  data_dir: str | os.PathLike, flag: str = "--config.data.dir"
) -> epath.Path:
  """Returns the folder that holds the character folders.

  Accepts the Kaggle archive's nesting (`simpsons_dataset/simpsons_dataset/`)
  and the archive root that contains `simpsons_dataset/`.
  """
  if not str(data_dir):
    raise DatasetError(f"No data folder given: set {flag}=/path/to/simpsons_dataset.")
  path = files.as_path(data_dir)
  if not path.exists():
    raise DatasetError(
      f"Data folder {path} does not exist: point {flag} at the "
      "Kaggle `simpsons_dataset` folder (one sub-folder per character)."
    )
  if not path.is_dir():
    raise DatasetError(
      f"Data folder {path} is a file, not a folder: point {flag} "
      "at the folder that holds one sub-folder per character."
    )
  for nested in (path / path.name, path / "simpsons_dataset"):
    if nested.is_dir():
      return resolve_data_dir(nested, flag)
  return path


def list_images(folder: epath.Path) -> list[epath.Path]:
  """Image files directly in `folder`, sorted by name.

  Hidden files are left out; broken links are listed, for the checks of
  `image_files` to report. On object stores a name is a file or a folder
  prefix, never both, and folders are not asked about one by one.
  """
  local = files.is_local(folder)
  return sorted(
    p
    for p in folder.iterdir()
    if not p.name.startswith(".")
    and p.suffix.lower() in IMAGE_EXTENSIONS
    and not (local and p.is_dir())
  )


def find_images(data_dir: str | os.PathLike) -> dict[str, list[epath.Path]]:
  """Maps every character folder of `data_dir` to its image files.

  Folders whose names are not valid UTF-8 are left out with a warning.
  """
  root = resolve_data_dir(data_dir)
  folders = [
    folder
    for folder in sorted(root.iterdir())
    if folder.is_dir() and not folder.name.startswith(".")
  ]
  for folder in folders:
    if files.name_problem(folder):
      logging.warning(
        "Left out the folder %r: its name is not valid UTF-8 (rename it).",
        os.fsdecode(folder),
      )
  return {
    folder.name: list_images(folder)
    for folder in folders
    if not files.name_problem(folder)
  }


def check_hold_out(names: Sequence[str], hold_out: Sequence[str]) -> None:
  """DatasetError when `--config.data.hold_out` names a character the data
  has none of, or every character (`names`: the data's characters). Called
  before any file is checked or written."""
  absent = sorted(set(hold_out) - set(names))
  if absent:
    raise DatasetError(
      f"--config.data.hold_out names characters the data has none of "
      f"({', '.join(absent)}); its characters: {', '.join(sorted(names))}."
    )
  if names and set(names) <= set(hold_out):
    raise DatasetError(
      f"--config.data.hold_out holds out every character of the data "
      f"({', '.join(sorted(names))}): nothing is left to train on; hold out fewer."
    )


# `config.data.negatives`: every folder below `min_images`.
BELOW_MIN_IMAGES = "below_min_images"


def negatives(
  spec: str,
  counts: Mapping[str, int],
  min_images: int,
  hold_out: Sequence[str] = (),
) -> tuple[str, ...]:
  """The folders whose images train as "none of these"
  (`config.data.negatives`), by name; `counts`: each folder's images. Folders
  held out stay out. DatasetError for a name the data has no folder for, or
  one also held out."""
  if not spec:
    return ()
  if spec == BELOW_MIN_IMAGES:
    return tuple(
      sorted(n for n, c in counts.items() if 0 < c < min_images and n not in hold_out)
    )
  names = tuple(sorted({n.strip() for n in spec.split(",") if n.strip()}))
  absent = [n for n in names if n not in counts]
  if absent:
    raise DatasetError(
      f"--config.data.negatives={spec!r} names folders the data has none of "
      f"({', '.join(absent)}); give '{BELOW_MIN_IMAGES}' or names among "
      f"{', '.join(sorted(counts))}."
    )
  both = sorted(set(names) & set(hold_out))
  if both:
    raise DatasetError(
      f"{', '.join(both)} both held out (--config.data.hold_out) and negatives "
      "(--config.data.negatives): a held-out character stays out of training; "
      "name it in one of them."
    )
  return names


def select(
  images: Mapping[str, list[epath.Path]],
  min_images: int,
  skipped: Mapping[str, int] | None = None,
) -> CharacterMap:
  """Keeps characters with at least `min_images` pictures, in sorted order.

  `skipped`: the unusable files per character (not in `images`), to say
  when those, not `min_images`, left no character."""
  kept = sorted(name for name, files in images.items() if len(files) >= min_images)
  if not kept:
    most = max((len(f) for f in images.values()), default=0)
    lost = sum((skipped or {}).values())
    if lost and any(
      len(images.get(name, [])) + skipped[name] >= min_images for name in skipped
    ):
      raise DatasetError(
        f"No character has at least min_images={min_images} usable pictures: "
        f"{lost} image files were skipped (their reasons in the log and in "
        "skipped_files.json; over the pixel limit: raise "
        "--config.data.max_image_pixels), the largest character keeps "
        f"{most}: fix or replace those files, or lower --config.data.min_images."
      )
    raise DatasetError(
      f"No character has at least min_images={min_images} pictures (found "
      f"{len(images)} character folders, the largest with {most}): lower "
      "--config.data.min_images or check --config.data.dir."
    )
  left_out = sorted(set(images) - set(kept))
  if left_out:
    logging.info(
      "Using %d of %d characters (min_images=%d); left out: %s.",
      len(kept),
      len(images),
      min_images,
      ", ".join(f"{name} ({len(images[name])})" for name in left_out),
    )
  return CharacterMap(
    names=tuple(kept), counts=tuple(len(images[name]) for name in kept)
  )


def load_or_create(
  workdir: str | os.PathLike,
  images: Mapping[str, list[epath.Path]],
  min_images: int,
  hold_out: Sequence[str] = (),
  skipped: Mapping[str, int] | None = None,
  negative: Sequence[str] = (),
) -> CharacterMap:
  """Returns the workdir's saved map, or selects one and saves it, leaving
  the characters of `hold_out` out (to be scored as unknown ones later) and
  the `negative` ones (trained as "none of these");
  `skipped` counts each character's unusable files (see `select`).

  A saved map whose characters are no longer exactly those selected from the
  folder is an error: continuing would silently relabel the model's outputs.
  """
  path = files.as_path(workdir) / MAP_FILENAME
  check_hold_out(tuple(images), hold_out)
  kept = {c: v for c, v in images.items() if c not in (*hold_out, *negative)}
  lost = {c: n for c, n in (skipped or {}).items() if c in kept}
  current = select(kept, min_images, lost)
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    current.save(path)
    return current
  saved = CharacterMap.load(path)
  if saved.names != current.names:
    missing = sorted(set(saved.names) - set(current.names))
    added = sorted(set(current.names) - set(saved.names))
    raise DatasetError(
      f"{path} lists other characters than the data folder gives now "
      f"(missing now: {missing or 'none'}; new: {added or 'none'}). Use the "
      "data folder and min_images the run started with, or a new --workdir."
    )
  return saved


def parse_test_filename(path: str | os.PathLike) -> str | None:
  """The character of a Kaggle test-set file (`abraham_grampa_simpson_12.jpg`).

  Returns None when the name does not end in `_<number>` before the extension.
  """
  match = _TEST_FILENAME.match(epath.Path(path).stem)
  return match["name"] if match else None


def find_labelled_images(
  folder: str | os.PathLike, flag: str = "--config.data.dir"
) -> dict[str, list[epath.Path]]:
  """Images per character of a folder in either Kaggle layout.

  The training layout (`<folder>/<character>/*.jpg`) or the test-set layout
  (`<folder>/<character>_<N>.jpg`); unparseable test-set names are filed
  under the empty name. `flag` names where the folder was given.
  """
  root = resolve_data_dir(folder, flag)
  flat = list_images(root)
  if not flat:
    return find_images(root)
  images: dict[str, list[epath.Path]] = {}
  for path in flat:
    images.setdefault(parse_test_filename(path) or "", []).append(path)
  return dict(sorted(images.items()))
