"""Image files in the Kaggle layout, `<data_dir>/<character>/*.jpg`, and the
synthetic demo folder.

Every file is checked before training (`image_files`), the characters are
chosen by `min_images` (`characters`), and the split is kept in the workdir
(`splits`); an example's key is `<character>/<file name>`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath

from simpsons_jax import characters, image_files, splits, synthetic
from simpsons_jax.data import core, near_copies


@dataclasses.dataclass(frozen=True, eq=False)
class Files(core.Examples):
  """Image files with their character ids; `sha256` (when known) per file."""

  paths: np.ndarray  # str
  labels: np.ndarray  # int32
  sha256: tuple[str, ...] = ()

  @classmethod
  def of(
    cls,
    images: Mapping[str, Sequence[epath.Path]],
    cmap: characters.CharacterMap,
    sha256: Mapping[epath.Path, str] | None = None,
  ) -> Files:
    """Every image of the map's characters, in character id order."""
    pairs = [(p, label) for label, name in enumerate(cmap.names) for p in images[name]]
    return cls(
      np.asarray([str(p) for p, _ in pairs], dtype=str),
      np.asarray([label for _, label in pairs], dtype=np.int32),
      tuple(sha256[p] for p, _ in pairs) if sha256 is not None else (),
    )

  def cache_key(self) -> str:
    digest = hashlib.sha256()
    for content, label in zip(self.sha256 or self.paths, self.labels, strict=True):
      digest.update(f"{content}\0{label}\n".encode())
    return digest.hexdigest()

  def encoded(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    shard = slice(process_index, None, process_count)
    ds = tf.data.Dataset.from_tensor_slices((self.paths[shard], self.labels[shard]))
    return ds.map(lambda path, label: (tf.io.read_file(path), label))

  def select(self, keep: np.ndarray) -> Files:
    """The examples where `keep` (bool, one per example) is true, in order."""
    return Files(
      self.paths[keep],
      self.labels[keep],
      tuple(np.asarray(self.sha256, dtype=object)[keep]) if self.sha256 else (),
    )

  def frames(self, indices: Sequence[int]) -> list[str]:
    return [str(self.paths[i]) for i in indices]


def max_pixels(config: ml_collections.ConfigDict) -> int:
  """The pixel limit of a config, also of one saved before the option existed."""
  return config.data.max_image_pixels


class FolderSource(core.DataSource):
  """`config.data.dir` in the Kaggle layout (`--config.data.source=folder`)."""

  def __init__(self, config: ml_collections.ConfigDict, spec: str = ""):
    del spec  # No options.
    self.config = config

  def root(self, workdir: epath.Path) -> epath.Path:
    """The folder that holds the character folders."""
    del workdir
    return characters.resolve_data_dir(self.config.data.dir)

  def find(self, workdir: epath.Path) -> dict[str, list[epath.Path]]:
    """Every candidate image file, per character."""
    return characters.find_images(self.root(workdir))

  def key(self, workdir: epath.Path, character: str, path: epath.Path) -> str:
    """The name of a file in the split: `<character>/<name>`."""
    del workdir
    return f"{character}/{path.name}"

  def path(self, workdir: epath.Path, key: str) -> epath.Path:
    """The file a key names (the inverse of `key`)."""
    return self.root(workdir) / key

  def _hashes(
    self, workdir: epath.Path, checked: image_files.UsableImages, names: Sequence[str]
  ) -> dict[str, str]:
    """Key -> SHA-256 of the usable files of the characters `names`."""
    return {
      self.key(workdir, name, path): checked.sha256[path]
      for name in names
      for path in checked.images[name]
    }

  def _files(self, workdir: epath.Path, chosen: Mapping[str, str], cmap) -> Files:
    labels = {name: i for i, name in enumerate(cmap.names)}  # Negatives: -1.
    return Files(
      np.asarray([str(self.path(workdir, key)) for key in chosen], dtype=str),
      np.asarray(
        [labels.get(splits.character(key), -1) for key in chosen], dtype=np.int32
      ),
      tuple(chosen.values()),
    )

  def prepare(self, workdir: epath.Path) -> core.Loaded:
    found = self.find(workdir)
    # Before any file is checked or anything written in the workdir.
    data = self.config.data
    characters.check_hold_out(tuple(found), data.hold_out)
    counts = {c: len(paths) for c, paths in found.items()}
    characters.negatives(data.negatives, counts, data.min_images, data.hold_out)
    checked = image_files.keep_usable(found, workdir, max_pixels(self.config))
    if self.config.data.exclude_copies_of:
      kept = near_copies.exclude(
        checked.images,
        self.config.data.exclude_copies_of,
        workdir,
        max_pixels(self.config),
      )
      checked = dataclasses.replace(checked, images=kept)
    skipped = {c: len(found[c]) - len(kept) for c, kept in checked.images.items()}
    usable = {c: len(paths) for c, paths in checked.images.items()}
    negative = characters.negatives(
      data.negatives, usable, data.min_images, data.hold_out
    )
    cmap = characters.load_or_create(
      workdir, checked.images, data.min_images, data.hold_out, skipped, negative
    )
    if negative:
      logging.info(
        "Negatives (trained as none of these): %d images of %d folders (%s).",
        sum(usable[c] for c in negative),
        len(negative),
        ", ".join(negative),
      )
    current = self._hashes(workdir, checked, (*cmap.names, *negative))
    train, val = splits.choose_and_save(workdir, current, cmap, self.config)
    return cmap, self._files(workdir, train, cmap), self._files(workdir, val, cmap)

  def load(self, workdir: epath.Path) -> core.Loaded:
    cmap = characters.CharacterMap.load(workdir / characters.MAP_FILENAME)
    train, val = splits.last_chosen(workdir, cmap)
    return cmap, self._files(workdir, train, cmap), self._files(workdir, val, cmap)

  def validation(self, workdir: epath.Path, report_dir: epath.Path | None) -> Files:
    cmap = characters.CharacterMap.load(workdir / characters.MAP_FILENAME)
    by_character = collections.defaultdict(list)
    for key in splits.saved_validation(workdir):
      by_character[splits.character(key)].append(self.path(workdir, key))
    checked = image_files.keep_usable(by_character, report_dir, max_pixels(self.config))
    known = tuple(c for c in checked.images if c in cmap.names)  # No negatives.
    current = self._hashes(workdir, checked, known)
    return self._files(workdir, splits.still_valid(workdir, current, cmap), cmap)


class SyntheticSource(FolderSource):
  """The procedural demo set, drawn into `<workdir>/synthetic_data` once."""

  def root(self, workdir: epath.Path) -> epath.Path:
    return synthetic.generate(
      workdir / "synthetic_data",
      self.config.data.synthetic_per_character,
      self.config.seed,
    )
