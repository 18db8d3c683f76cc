"""Scoring a model on a data set: one code path for the loop and `--mode=evaluate`.

`scorer` is the one jitted function that turns a padded batch into metric
sums (loss, correct, top-3, count, confusion matrix) over its real examples,
and every example's probabilities (one model pass: `evaluate`'s figures reuse
them); `metrics.summarize` turns accumulated sums into figures. The training loop
scores its validation split with it every epoch, and every extra evaluator
of `config.evals` every `every_epochs`; `--mode=evaluate` goes through the
same `Evaluator`, so a report written during training and one written by
`evaluate` from the same checkpoint hold the same numbers.

An extra evaluator is an entry of `config.evals` whose `type` names its data
in `EVALUATORS`: the run's validation split, a folder in either Kaggle layout
or a split of a prepared TFDS data set, e.g.

  config.evals.kaggle_test = dict(
      type="folder", dir="~/data/kaggle_simpson_testset", every_epochs=5)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from simpsons_jax import (
  characters,
  data,
  errors,
  files,
  image_files,
  input_pipeline,
  metrics,
  models,
  sharding,
  summary,
)
from simpsons_jax.data import core, folder

REPORT_FILENAME = "report.json"
# An evaluator's data: its examples, and the entries of characters the model
# does not know, by name (listed in the report, never scored).
Read = tuple[core.Examples, dict[str, list[str]]]


def batch_scores(
  apply_fn: Callable,
  variables: Any,
  batch: Mapping[str, jax.Array],
  num_classes: int,
  flip: bool = False,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Metric sums over the real (mask=1) examples of a padded batch, and each
  row's softmax probabilities, label, energy score and the mask."""
  logits, raw = models.inference_outputs(apply_fn, variables, batch["image"], flip)
  labels, mask = batch["label"], batch["mask"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  predicted = logits.argmax(-1)
  top3 = jax.lax.top_k(logits, min(3, num_classes))[1]
  true_onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
  sums = {
    "loss_sum": (losses * mask).sum(),
    "correct": ((predicted == labels) * mask).sum(),
    "top3_correct": ((top3 == labels[:, None]).any(-1) * mask).sum(),
    "count": mask.sum(),
    "confusion": true_onehot.T @ jax.nn.one_hot(predicted, num_classes),
  }
  rows = {
    "probabilities": jax.nn.softmax(logits),
    "labels": labels,
    # Higher for inputs like the training data (Liu et al. 2020: -energy).
    "logsumexp": jax.nn.logsumexp(raw, axis=-1),
    "mask": mask,
  }
  return sums, rows


def scorer(
  mesh: Mesh, apply_fn: Callable, num_classes: int, flip: bool = False
) -> Callable[[Any, Mapping[str, jax.Array]], tuple[dict, dict]]:
  """`batch_scores` of (variables, batch), jitted for `mesh`: the batch
  sharded on its `data` axis, the variables and the outputs replicated."""
  return jax.jit(
    functools.partial(batch_scores, apply_fn, num_classes=num_classes, flip=flip),
    in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def accumulate(
  score: Callable, variables: Any, batches: list[input_pipeline.Batch], mesh: Mesh
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The sums of `score` over all batches, each batch's fetched and added on
  the host in float64 (`metrics.add`), and the rows of the real examples in
  the batches' order: `probabilities` (N, characters), `labels`, `logsumexp`."""
  totals, rows = None, []
  for batch in sharding.prefetch(batches, mesh):
    sums, batch_rows = jax.device_get(score(variables, batch))
    totals = metrics.add(totals, sums)
    real = batch_rows.pop("mask").astype(bool)
    rows.append({k: v[real] for k, v in batch_rows.items()})
  return totals, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def report(totals: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
  """Accuracy, top-3, loss, macro figures, per character and the confusion
  matrix (rows: true character) from accumulated sums."""
  confusion = np.rint(np.asarray(totals["confusion"])).astype(np.int64)
  return {
    "num_examples": int(round(float(totals["count"]))),
    **metrics.summarize(totals),
    "per_class": metrics.per_class_report(confusion, names),
    "characters": list(names),
    "confusion_matrix": confusion.tolist(),
  }


@dataclasses.dataclass
class Evaluator:
  """One data set to score: its examples, and the files left out of it."""

  name: str
  examples: core.Examples
  skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  every_epochs: int = 1
  _batches: list | None = None

  def batches(self, config: ml_collections.ConfigDict) -> list[input_pipeline.Batch]:
    """The padded batches (made once: the decoded images are cached)."""
    if self._batches is None:
      self._batches = input_pipeline.eval_batches(
        self.examples,
        config.data.image_size,
        config.train.batch_size,
        config.data.cache_dir,
        jax.process_index(),
        jax.process_count(),
      )
    return self._batches

  def run(
    self,
    fn: Callable,
    variables: Any,
    mesh: Mesh,
    config: ml_collections.ConfigDict,
    names: tuple[str, ...],
  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The report of `variables` on this data set (see `report`), and the
    rows of its examples, in order (see `accumulate`)."""
    totals, rows = accumulate(fn, variables, self.batches(config), mesh)
    return {
      "name": self.name,
      **report(totals, names),
      "skipped": sum(len(f) for f in self.skipped.values()),
      "unknown_characters": {k: len(v) for k, v in self.skipped.items()},
      "skipped_files": sorted(p for paths in self.skipped.values() for p in paths),
    }, rows


class ValidationData:
  """The run's own validation split, checked again (`type="validation"`)."""

  required: tuple[str, ...] = ()

  def read(self, spec, cmap, report_dir, config, workdir) -> Read:
    del spec, cmap  # The split's own characters are the model's.
    examples = data.create(config).validation(workdir, report_dir)
    if not len(examples):
      raise errors.UserError(
        f"The validation split of {workdir} has no image left: see the log."
      )
    return examples, {}


class FolderData:
  """A folder in the Kaggle training layout (`<character>/*.jpg`) or test-set
  layout (`<character>_<N>.jpg`): `type="folder", dir=...`."""

  required = ("dir",)

  def find(self, spec: Mapping[str, Any]) -> dict[str, list[epath.Path]]:
    """The image files of the entry, by character name ('' if unreadable)."""
    return characters.find_labelled_images(spec["dir"], "the evaluator's dir")

  def read(self, spec, cmap, report_dir, config, workdir) -> Read:
    del workdir
    checked = image_files.keep_usable(
      self.find(spec),
      report_dir,
      config.data.max_image_pixels,
    )
    known = {c: checked.images.get(c, []) for c in cmap.names}
    others = {c: [str(p) for p in paths] for c, paths in checked.images.items()}
    return folder.Files.of(known, cmap, checked.sha256), _unknown(others, cmap)


def unknown_examples(
  folder_dir: str,
  cmap: characters.CharacterMap,
  report_dir: epath.Path | None,
  config: ml_collections.ConfigDict,
) -> core.Examples:
  """The images of a folder (either Kaggle layout) of characters the model
  does not know, each labelled 0 (their label is never scored)."""
  checked = image_files.keep_usable(
    characters.find_labelled_images(folder_dir, "--unknown_dir"),
    report_dir,
    config.data.max_image_pixels,
  )
  paths = [
    p for c, found in checked.images.items() if c not in cmap.names for p in found
  ]
  if not paths:
    raise errors.UserError(
      f"{folder_dir} has no image of a character the model does not know "
      f"(it knows {', '.join(cmap.names)}): give --unknown_dir a folder of others."
    )
  return folder.Files(
    np.asarray([str(p) for p in paths], dtype=str),
    np.zeros(len(paths), np.int32),
    tuple(checked.sha256[p] for p in paths),
  )


# Every evaluator `type` of `config.evals`, as 'module:Class' (imported when
# used: TFDS loads only for tfds evaluators): a class with `required` (the
# keys its entry must have) and `read(spec, cmap, report_dir, config,
# workdir)`, returning the examples of the model's characters and the entries
# of the others by name.
EVALUATORS: dict[str, str] = {
  "validation": "simpsons_jax.evaluators:ValidationData",
  "folder": "simpsons_jax.evaluators:FolderData",
  "tfds": "simpsons_jax.data.tfds:TfdsData",
}


def _unknown(
  by_character: Mapping[str, list[str]], cmap: characters.CharacterMap
) -> dict[str, list[str]]:
  """The entries of characters the model does not know (never scored)."""
  return {
    c or "<unparseable name>": list(items)
    for c, items in by_character.items()
    if c not in cmap.names and items
  }


def problems(evals: Mapping[str, Any]) -> list[str]:
  """What is wrong with `config.evals`' entries, one phrase each."""
  found = []
  for name, spec in evals.items():
    kind = spec.get("type", "") if hasattr(spec, "get") else ""
    if kind not in EVALUATORS:
      found.append(f"evals.{name}.type={kind!r} must be one of {', '.join(EVALUATORS)}")
      continue
    module, _, cls = EVALUATORS[kind].partition(":")
    required = getattr(importlib.import_module(module), cls).required
    missing = [key for key in required if not spec.get(key)]
    if missing:
      found.append(f"evals.{name} (type {kind}) needs {', '.join(missing)}")
  return found


def create(
  name: str,
  spec: Mapping[str, Any],
  cmap: characters.CharacterMap,
  report_dir: epath.Path | None,
  config: ml_collections.ConfigDict,
  workdir: epath.Path,
) -> Evaluator:
  """The evaluator of one `config.evals` entry (its `type` picks the data)."""
  (problem,) = problems({name: spec}) or (None,)
  if problem:
    raise errors.UserError(f"Invalid evaluator: {problem}.")
  module, _, cls = EVALUATORS[spec["type"]].partition(":")
  reader = getattr(importlib.import_module(module), cls)()
  examples, skipped = reader.read(spec, cmap, report_dir, config, workdir)
  if not len(examples):
    raise errors.UserError(
      f"{name} ({spec['type']}) has no image of the model's characters "
      f"({', '.join(cmap.names)})."
    )
  return Evaluator(name, examples, skipped, spec.get("every_epochs", 1))


def from_config(
  config: ml_collections.ConfigDict, cmap: characters.CharacterMap, workdir: epath.Path
) -> list[Evaluator]:
  """The extra evaluators of `config.evals`, scored during training.

  Their file checks are written under `<workdir>/eval/<name>` by process 0.
  """
  is_process_0 = jax.process_index() == 0
  return [
    create(
      name,
      spec,
      cmap,
      workdir / "eval" / name if is_process_0 else None,
      config,
      workdir,
    )
    for name, spec in config.evals.items()
  ]


def write(
  result: Mapping[str, Any],
  out: epath.Path,
  board: epath.Path,
  step: int,
  images: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
  """Writes and returns `out/report.json`: `result`, written last, with the
  PNG figures beside it (each written whole before) listed with their
  SHA-256, so that a report and its figures are known to be one
  evaluation's; the headline figures (and `images`) in TensorBoard under
  `board`."""
  out.mkdir(parents=True, exist_ok=True)
  drawn = [out / f"{tag}.png" for tag in sorted(images or {})]
  figures = {
    path.name: hashlib.sha256(path.read_bytes()).hexdigest()
    for path in drawn
    if path.exists()
  }
  report = {**result, "figures": figures}
  files.write_text_atomic(out / REPORT_FILENAME, json.dumps(report, indent=2) + "\n")
  writer = summary.create_writer(board)
  writer.write_images(step, {tag: image[None] for tag, image in (images or {}).items()})
  writer.write_scalars(
    step, {k: result[k] for k in ("accuracy", "top3_accuracy", "macro_f1")}
  )
  writer.close()
  return report
