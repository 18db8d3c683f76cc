"""Which images train and which validate: decided once per run, then kept.

The first run of a workdir splits the usable images of its characters, seeded
and stratified by character (`val_fraction` of each to validation, then
`train_fraction` of the rest to training), and saves the decision in
`<workdir>/split.json`: every file by its path under the data folder, with its
SHA-256. Resumes, `evaluate` and `show_data` use that decision, whatever
happened to the folder since, by these rules:

* exact copies (the same SHA-256) land on one side together; the same image
  filed under two characters is reported and never validates;
* a file once in validation never trains, and one in training never validates;
* a new file, or a training file whose content changed, joins training,
  unless its content is that of a validation image (even a missing one):
  then it is left out;
* a validation file that went missing or changed is left out of validation.

The run's negatives (`config.data.negatives`) split the same way, except that
a share of their characters (`config.data.negatives_val_share`, at least one
and never all) validates whole: the run then chooses how it says "unknown" on
characters it never trained on, as it will meet them. Those characters are
kept in `split.json`; a new file of theirs is left out.

Every difference from the saved split is counted in the log with examples.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from simpsons_jax import errors, files

SPLIT_FILENAME = "split.json"
_FORMAT = 1
_SHOWN = 5  # Example paths per kind of change in the log.

if TYPE_CHECKING:
  from simpsons_jax import characters


@dataclasses.dataclass
class Record:
  """The saved decision: path under the data folder -> SHA-256, per side.

  `unused` holds the training side's files that `train_fraction` left out.
  """

  train: dict[str, str]
  val: dict[str, str]
  unused: dict[str, str]

  def to_json(self) -> dict[str, dict[str, str]]:
    return {"train": self.train, "val": self.val, "unused": self.unused}


def character(key: str) -> str:
  """The character of a key (`<character>/<name>`): the part before the first '/'."""
  return key.split("/", 1)[0]


def _sample_per_label(
  labels: np.ndarray, eligible: np.ndarray, fraction: float, seed: int, leave: int
) -> np.ndarray:
  """Seeded positions of about `fraction` of each label's items, drawn from
  the eligible ones: at least one, at most all but `leave` of the label."""
  rng = np.random.default_rng(seed)
  taken = []
  for label in np.unique(labels):
    every = np.flatnonzero(labels == label)
    candidates = every[eligible[every]]
    count = min(
      len(every) - leave, len(candidates), max(1, round(fraction * len(every)))
    )
    taken.append(rng.permutation(candidates)[:count])
  return np.sort(np.concatenate(taken)) if taken else np.zeros(0, np.int64)


def validating_whole(negatives: tuple[str, ...], share: float, seed: int) -> tuple:
  """The negative characters that only validate: a seeded `share` of them,
  at least one and never all (none of fewer than two, or with share 0)."""
  if len(negatives) < 2 or share <= 0:
    return ()
  count = min(len(negatives) - 1, max(1, round(share * len(negatives))))
  chosen = np.random.default_rng(seed).permutation(sorted(negatives))[:count]
  return tuple(sorted(chosen.tolist()))


def decide(
  current: Mapping[str, str],
  names: tuple[str, ...],
  val_fraction: float,
  train_fraction: float,
  seed: int,
  whole: tuple[str, ...] = (),
) -> Record:
  """A fresh split of `current` (path under the data folder -> SHA-256);
  the characters `whole` validate whole.

  Copies are split as one item; an image under two characters trains.
  """
  label_of = {name: i for i, name in enumerate(names)}
  ordered = sorted(current, key=lambda p: (label_of[character(p)], p))
  groups: dict[tuple[int, str], list[str]] = {}
  for path in ordered:
    groups.setdefault((label_of[character(path)], current[path]), []).append(path)
  keys = list(groups)
  labels_per_hash = collections.defaultdict(set)
  for label, sha in keys:
    labels_per_hash[sha].add(label)
  labels = np.asarray([label for label, _ in keys], np.int64)
  eligible = np.asarray([len(labels_per_hash[sha]) == 1 for _, sha in keys], bool)
  val_groups = set(
    _sample_per_label(labels, eligible, val_fraction, seed, leave=1).tolist()
  )
  val_groups |= {
    i for i, (label, _) in enumerate(keys) if names[label] in whole and eligible[i]
  }
  val = [p for i, key in enumerate(keys) if i in val_groups for p in groups[key]]
  train = [p for i, key in enumerate(keys) if i not in val_groups for p in groups[key]]
  train.sort(key=lambda p: (label_of[character(p)], p))
  kept = set(range(len(train)))
  if train_fraction < 1:
    train_labels = np.asarray([label_of[character(p)] for p in train])
    everything = np.ones(len(train), bool)
    kept = set(
      _sample_per_label(train_labels, everything, train_fraction, seed + 1, 0).tolist()
    )
  return Record(
    train={p: current[p] for i, p in enumerate(train) if i in kept},
    val={p: current[p] for p in sorted(val)},
    unused={p: current[p] for i, p in enumerate(train) if i not in kept},
  )


@dataclasses.dataclass
class Changes:
  """How the folder differs from the saved split, file by file."""

  new: list[str] = dataclasses.field(default_factory=list)
  changed: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  val_changed: list[str] = dataclasses.field(default_factory=list)
  copies_of_val: list[str] = dataclasses.field(default_factory=list)
  of_whole: list[str] = dataclasses.field(default_factory=list)

  def log(self, where: epath.Path) -> None:
    lines = {
      "new file(s) joining training": self.new,
      "changed training file(s), trained with their new content": self.changed,
      "file(s) of the split missing": self.missing,
      "changed validation file(s), left out of validation": self.val_changed,
      "new or changed file(s) that copy a validation image, left out": (
        self.copies_of_val
      ),
      "new file(s) of negatives that only validate, left out": self.of_whole,
    }
    for what, paths in lines.items():
      if paths:
        logging.warning(
          "The data folder changed since %s was saved: %d %s: %s%s",
          where,
          len(paths),
          what,
          ", ".join(paths[:_SHOWN]),
          ", ..." if len(paths) > _SHOWN else "",
        )


def reconcile(
  record: Record, current: Mapping[str, str], whole: tuple[str, ...] = ()
) -> tuple[Record, Changes]:
  """The record updated for the folder as it is now, and what changed; new
  files of the characters `whole` (validating whole) are left out.

  The returned record's `val` holds only the validation files present and
  unchanged; its `train` every file that trains now.
  """
  changes = Changes()
  val = {}
  for path, sha in record.val.items():
    if path not in current:
      changes.missing.append(path)
    elif current[path] != sha:
      changes.val_changed.append(path)
    else:
      val[path] = sha
  # Also those of missing validation files, which may come back.
  val_hashes = set(record.val.values())
  train = {}
  for path, sha in current.items():
    if path in record.val or path in record.unused:
      continue
    if sha in val_hashes:
      changes.copies_of_val.append(path)
    elif path not in record.train and character(path) in whole:
      changes.of_whole.append(path)
    elif path not in record.train:
      changes.new.append(path)
      train[path] = sha
    else:
      if record.train[path] != sha:
        changes.changed.append(path)
      train[path] = sha
  changes.missing += [p for p in (*record.train, *record.unused) if p not in current]
  return Record(train, val, record.unused), changes


def _warn_about_conflicts(current: Mapping[str, str]) -> None:
  """Logs the images filed under more than one character."""
  by_hash = collections.defaultdict(list)
  for path, sha in current.items():
    by_hash[sha].append(path)
  conflicts = [
    paths for paths in by_hash.values() if len({character(p) for p in paths}) > 1
  ]
  if conflicts:
    logging.warning(
      "%d image(s) filed under more than one character; they train with "
      "each label and never validate: %s",
      len(conflicts),
      "; ".join(" = ".join(sorted(paths)) for paths in conflicts[:_SHOWN]),
    )


def _count_copies(record: Record) -> None:
  for side, part in (("training", record.train), ("validation", record.val)):
    copies = len(part) - len(set(part.values()))
    if copies:
      logging.info("%d %s image(s) are exact copies of others there.", copies, side)


def ordered(keys: Mapping[str, str], cmap: characters.CharacterMap) -> dict[str, str]:
  """Key -> SHA-256 in the order the examples take: by character id, then key;
  the negatives' (characters not in `cmap`) last, by name."""
  label_of = {name: i for i, name in enumerate(cmap.names)}

  def position(key: str) -> tuple:
    name = character(key)
    return (label_of.get(name, len(label_of)), name, key)

  return {k: keys[k] for k in sorted(keys, key=position)}


def names_in(current: Mapping[str, str], cmap: characters.CharacterMap) -> tuple:
  """`cmap`'s characters, then the other characters of `current`'s keys (the
  run's negatives), by name: the labels a split is stratified by."""
  others = sorted({character(k) for k in current} - set(cmap.names))
  return (*cmap.names, *others)


def _restore_or_restart(workdir: epath.Path) -> str:
  return (
    f"restore it, or start afresh with --config.restart=True (the run in "
    f"{workdir} moves to archive/)."
  )


def _load(workdir: epath.Path) -> dict:
  path = workdir / SPLIT_FILENAME
  if not path.exists():
    raise errors.UserError(
      f"{path} is missing: the run was trained before splits were saved, or "
      "not at all. Run its training command (once more) to save it; evaluate "
      "can score another folder with --eval_dir."
    )
  data = files.read_json(path, _restore_or_restart(workdir))
  try:
    if data["format"] != _FORMAT:
      raise ValueError(f"format {data['format']}")
    Record(**{side: dict(data[side]) for side in ("train", "val", "unused")})
    whole = data.get("val_characters", [])
    if not isinstance(whole, list) or not all(isinstance(c, str) for c in whole):
      raise ValueError("val_characters is not a list of names")
    return data
  except (KeyError, TypeError, ValueError) as e:
    raise files.DamagedFileError(
      f"{path} is damaged ({e}): {_restore_or_restart(workdir)}"
    ) from e


def _record(data: Mapping) -> Record:
  return Record(**{side: dict(data[side]) for side in ("train", "val", "unused")})


def choose_and_save(
  workdir: str | os.PathLike,
  current: Mapping[str, str],
  cmap: characters.CharacterMap,
  config: ml_collections.ConfigDict,
) -> tuple[dict[str, str], dict[str, str]]:
  """The training and validation keys of this run, each with its SHA-256, in
  example order; see the module docstring.

  `current` maps each usable example of `cmap`'s characters, and of the run's
  negatives (`config.data.negatives`, stratified as characters of their own),
  by its key (`<character>/<name>`), to the SHA-256 of its bytes. Saves the decision on
  the first run, and the keys in use on every run (`last_chosen` reads them).
  """
  workdir = files.as_path(workdir)
  path = workdir / SPLIT_FILENAME
  _warn_about_conflicts(current)
  if path.exists():
    loaded = _load(workdir)
    record, whole = _record(loaded), tuple(loaded.get("val_characters", ()))
  else:
    names = names_in(current, cmap)
    whole = validating_whole(
      names[len(cmap.names) :], config.data.negatives_val_share, config.seed
    )
    record = decide(
      current,
      names,
      config.data.val_fraction,
      config.data.train_fraction,
      config.seed,
      whole,
    )
  used, changes = reconcile(record, current, whole)
  changes.log(path)
  _count_copies(used)
  saved = Record({**record.train, **used.train}, record.val, record.unused)
  data = {"format": _FORMAT, **saved.to_json(), "val_characters": list(whole)}
  data["in_use"] = {"train": sorted(used.train), "val": sorted(used.val)}
  files.write_text_atomic(path, json.dumps(data, indent=1) + "\n")
  unseen = sorted(set(cmap.names) - {character(k) for k in used.val})
  if unseen:
    logging.warning(
      "No validation image for %s: too few images to split.", ", ".join(unseen)
    )
  return ordered(used.train, cmap), ordered(used.val, cmap)


def last_chosen(
  workdir: str | os.PathLike, cmap: characters.CharacterMap
) -> tuple[dict[str, str], dict[str, str]]:
  """The training and validation keys (with SHA-256) `choose_and_save` last chose."""
  data = _load(files.as_path(workdir))
  record = _record(data)
  train = {k: record.train[k] for k in data["in_use"]["train"]}
  val = {k: record.val[k] for k in data["in_use"]["val"]}
  return ordered(train, cmap), ordered(val, cmap)


def saved_validation(workdir: str | os.PathLike) -> dict[str, str]:
  """The saved validation keys and their SHA-256, present now or not."""
  return _record(_load(files.as_path(workdir))).val


def still_valid(
  workdir: str | os.PathLike,
  current: Mapping[str, str],
  cmap: characters.CharacterMap,
) -> dict[str, str]:
  """The saved validation keys of `cmap`'s characters (not the negatives')
  whose content in `current` is unchanged.

  The others (missing, changed, unusable now) are logged.
  """
  workdir = files.as_path(workdir)
  saved = {
    k: v for k, v in saved_validation(workdir).items() if character(k) in cmap.names
  }
  used, changes = reconcile(Record({}, saved, {}), current)
  changes.log(workdir / SPLIT_FILENAME)
  return ordered(used.val, cmap)
