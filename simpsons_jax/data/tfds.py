"""Any prepared TFDS image-classification data set (`--config.data.source=tfds:NAME`).

`tfds:NAME[:VERSION]` reads `config.data.tfds_split` ("train") of the data set
prepared under `config.data.tfds_dir` (TFDS's default when empty): the class
names come from its `label` feature, the images from its `image` feature.
Characters are chosen by `min_images` and the split is carved, kept and
saved exactly as for a folder (`splits`); an example's key is its
`file_name` feature when it has one, else `<class>/<index>`. The project's
own `simpsons_characters` builder (`simpsons_jax/tfds_builders`) is
registered with TFDS when a data set is first looked up (`register_builders`),
not when this module is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from simpsons_jax import characters, errors, image_files, splits
from simpsons_jax.data import core


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsExamples(core.Examples):
  """Chosen examples of a TFDS split, in the split's own order."""

  builder: tfds.core.DatasetBuilder
  split: str
  indices: np.ndarray  # int64, positions in the split, ascending.
  labels: np.ndarray  # int32, character ids.
  content: str  # A hash of the chosen examples' keys and SHA-256.

  def cache_key(self) -> str:
    return f"{self.builder.info.full_name}\0{self.split}\0{self.content}"

  def _chosen(self) -> tf.data.Dataset:
    """(position among the chosen, image bytes, label) in split order."""
    size = self.builder.info.splits[self.split].num_examples
    slot = np.full(size, -1, np.int64)
    slot[self.indices] = np.arange(len(self.indices))
    slot_table, labels = tf.constant(slot), tf.constant(self.labels)
    ds = _raw(self.builder, self.split).enumerate()
    ds = ds.map(lambda i, example: (slot_table[i], example["image"]))
    ds = ds.filter(lambda position, contents: position >= 0)
    return ds.map(lambda position, contents: (position, contents, labels[position]))

  def encoded(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    ds = self._chosen().shard(process_count, process_index)
    return ds.map(lambda position, contents, label: (contents, label))

  def frames(self, indices: Sequence[int]) -> list[np.ndarray]:
    wanted = {int(i) for i in indices}
    found = {}
    for position, contents, _ in self._chosen().as_numpy_iterator():
      if position in wanted:
        found[int(position)] = image_files.decode(contents).numpy()
        if len(found) == len(wanted):
          break
    return [found[int(i)] for i in indices]


# This project's TFDS builders: their modules register them when imported.
BUILDERS = ("simpsons_jax.tfds_builders.simpsons_characters",)


def register_builders() -> None:
  """Registers this project's TFDS builders with TFDS (once; importing their
  modules does it), for `tfds.builder` to find them by name."""
  for module in BUILDERS:
    importlib.import_module(module)


def data_set_name(spec: str) -> str:
  """'NAME' or 'NAME:VERSION', checked."""
  name, _, version = spec.partition(":")
  if not name:
    raise errors.UserError(
      "--config.data.source=tfds: needs a data set name, e.g. tfds:simpsons_characters."
    )
  return f"{name}:{version}" if version else name


def _raw(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  """The split's examples in their stored order, images still encoded."""
  return builder.as_dataset(
    split=split,
    shuffle_files=False,
    decoders={"image": tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(interleave_cycle_length=1),
  )


@dataclasses.dataclass(frozen=True)
class _Scan:
  """Every example of a split: key -> (position, SHA-256), and keys per class."""

  positions: dict[str, int]
  sha256: dict[str, str]
  by_class: dict[str, list[str]]


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
  """A split of a prepared TFDS data set ('NAME' or 'NAME:VERSION')."""

  name: str
  split: str
  data_dir: str = ""  # '': TFDS's default.

  def builder(self) -> tfds.core.DatasetBuilder:
    """The prepared data set's builder; one sentence if it is not there."""
    data_dir = self.data_dir or None
    register_builders()
    try:
      builder = tfds.builder(self.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      name = self.name.partition(":")[0]
      close = difflib.get_close_matches(name, tfds.list_builders(), n=3, cutoff=0.6)
      hint = f"did you mean {', '.join(close)}? " if close else ""
      raise errors.UserError(
        f"tfds:{self.name}: TFDS has no data set {name!r}; {hint}"
        "`tfds.list_builders()` lists them (this project's own: simpsons_characters)."
      ) from None
    if not builder.is_prepared():
      raise errors.UserError(
        f"The TFDS data set {self.name} is not prepared in "
        f"{data_dir or 'the default data dir'}: build it first, for this "
        "project's own data set with `python -m "
        "simpsons_jax.tfds_builders.simpsons_characters --manual_dir=<Kaggle "
        "folder> --data_dir=<dir>`, and pass --config.data.tfds_dir=<dir>."
      )
    return builder

  def scan(self, builder: tfds.core.DatasetBuilder, hashes: bool) -> _Scan:
    """Every example's key, position and (with `hashes`) SHA-256."""
    names = builder.info.features["label"].names
    positions, sha256, by_class = {}, {}, {name: [] for name in names}
    for position, example in enumerate(_raw(builder, self.split).as_numpy_iterator()):
      name = names[example["label"]]
      file_name = example.get("file_name", b"").decode()
      key = file_name if file_name.startswith(f"{name}/") else f"{name}/{position:06d}"
      positions[key] = position
      by_class[name].append(key)
      if hashes:
        sha256[key] = hashlib.sha256(example["image"]).hexdigest()
    return _Scan(positions, sha256, by_class)

  def examples(
    self,
    builder: tfds.core.DatasetBuilder,
    scan: _Scan,
    chosen: Mapping[str, str],
    cmap: characters.CharacterMap,
  ) -> TfdsExamples:
    """The `chosen` examples (key -> SHA-256), labelled by `cmap`."""
    labels = {name: i for i, name in enumerate(cmap.names)}
    keys = sorted(chosen, key=scan.positions.__getitem__)
    content = hashlib.sha256("".join(f"{k}\0{chosen[k]}\n" for k in keys).encode())
    return TfdsExamples(
      builder,
      self.split,
      np.asarray([scan.positions[k] for k in keys], np.int64),
      np.asarray([labels[splits.character(k)] for k in keys], np.int32),
      content.hexdigest(),
    )


class TfdsSource(core.DataSource):
  """A prepared TFDS data set; `spec` is 'NAME' or 'NAME:VERSION'."""

  def __init__(self, config: ml_collections.ConfigDict, spec: str):
    self.config = config
    self.data = TfdsSplit(
      data_set_name(spec), config.data.tfds_split, config.data.tfds_dir
    )
    if config.data.negatives:
      raise errors.UserError(
        "--config.data.negatives applies to folders of image files, not to "
        f"data.source={config.data.source}: train from the folder "
        "(--config.data.source=folder)."
      )
    if config.data.exclude_copies_of:
      raise errors.UserError(
        "exclude_copies_of applies to folders of image files, not to "
        f"data.source={config.data.source}: train from the folder "
        "(--config.data.source=folder), or build the TFDS data set from a "
        "folder without those images."
      )

  def prepare(self, workdir: epath.Path) -> core.Loaded:
    builder = self.data.builder()
    scan = self.data.scan(builder, hashes=True)
    cmap = characters.load_or_create(
      workdir, scan.by_class, self.config.data.min_images, self.config.data.hold_out
    )
    current = {k: scan.sha256[k] for name in cmap.names for k in scan.by_class[name]}
    train, val = splits.choose_and_save(workdir, current, cmap, self.config)
    return (
      cmap,
      self.data.examples(builder, scan, train, cmap),
      self.data.examples(builder, scan, val, cmap),
    )

  def load(self, workdir: epath.Path) -> core.Loaded:
    builder = self.data.builder()
    scan = self.data.scan(builder, hashes=False)
    cmap = characters.CharacterMap.load(workdir / characters.MAP_FILENAME)
    train, val = splits.last_chosen(workdir, cmap)
    return (
      cmap,
      self.data.examples(builder, scan, train, cmap),
      self.data.examples(builder, scan, val, cmap),
    )

  def validation(
    self, workdir: epath.Path, report_dir: epath.Path | None
  ) -> TfdsExamples:
    del report_dir  # A prepared data set holds no unusable files.
    builder = self.data.builder()
    scan = self.data.scan(builder, hashes=True)
    cmap = characters.CharacterMap.load(workdir / characters.MAP_FILENAME)
    val = splits.still_valid(workdir, scan.sha256, cmap)
    return self.data.examples(builder, scan, val, cmap)
