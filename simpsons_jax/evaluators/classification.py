"""How well the model names the characters of a data set: accuracy, top-3,
macro-F1, balanced accuracy, per character and the confusion matrix; drawn,
random frames and mismatches with where the model looked, and the confusion
matrix.

The data is the type's: the run's own validation split (`validation`), a
folder in the Kaggle training (`<character>/*.jpg`) or test-set layout
(`<character>_<N>.jpg`; `folder`, `dir=...`), or a split of a prepared TFDS
data set (`tfds`, in `tfds_split`). Images of characters the model does not
know are counted and listed in the report, never scored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from simpsons_jax import characters, data, errors, explain, image_files, metrics, plots
from simpsons_jax.data import core, folder
from simpsons_jax.evaluators import base, scoring

NUM_SHOWN = 9
MAX_MISMATCHES = 16
# What a data set read gives: its examples of the model's characters, and
# the entries of the others by name (listed, never scored).
Read = tuple[core.Examples, dict[str, list[str]]]


class Classification(base.Evaluator):
  """The figures of a data set of the model's characters; subclasses `read`
  it. `examples` given: those (the training loop's validation split)."""

  def __init__(
    self,
    name: str,
    spec: Mapping[str, Any],
    context: base.Context,
    examples: core.Examples | None = None,
  ):
    super().__init__(name, spec, context)
    self.skipped: dict[str, list[str]] = {}
    self._data = None if examples is None else scoring.Data(examples, context.config)

  @property
  def data(self) -> scoring.Data:
    """The examples and their batches, read at first use."""
    if self._data is None:
      examples, self.skipped = self.read()
      if not len(examples):
        raise errors.UserError(
          f"{self.name} ({self.spec.get('type')}) has no image of the model's "
          f"characters ({', '.join(self.context.cmap.names)})."
        )
      self._data = scoring.Data(examples, self.context.config)
    return self._data

  def read(self) -> Read:
    """The examples of the model's characters, and the others' entries."""
    raise NotImplementedError(f"{type(self).__name__} reads no data")

  def run(self, model: scoring.Model, draw_in: epath.Path | None = None) -> base.Result:
    totals, _ = model.outputs(self.data)
    names = self.context.cmap.names
    report = {
      "name": self.name,
      **scoring.report(totals, names),
      "skipped": sum(len(f) for f in self.skipped.values()),
      "unknown_characters": {k: len(v) for k, v in self.skipped.items()},
      "skipped_files": sorted(p for paths in self.skipped.values() for p in paths),
    }
    scalars = metrics.summarize(totals)  # In the order the loop has always logged.
    images = {} if draw_in is None else self.draw(model, report, draw_in)
    return base.Result(scalars, report, images)

  def draw(
    self,
    model: scoring.Model,
    report: Mapping[str, Any],
    out: epath.Path,
    seed: int = 0,
  ) -> dict[str, np.ndarray]:
    """Random frames and mismatches, each with the Grad-CAM map of its answer
    over it, and the confusion matrix, as PNGs in `out`."""
    config, names = self.context.config, self.context.cmap.names
    examples = self.data.examples
    probs = model.calibrated(self.data)
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    maps = explain.explainer(config, len(names), model.variables)

    def grid(indices: np.ndarray, name: str, title: str) -> np.ndarray:
      images = examples.model_inputs(indices, config.data.image_size)
      return plots.prediction_grid(
        examples.frames(indices),
        [names[examples.labels[i]] for i in indices],
        [names[predicted[i]] for i in indices],
        [confidence[i] for i in indices],
        out / f"{name}.png",
        title,
        maps(images, predicted[indices])["grad_cam"],
      )

    rng = np.random.default_rng(seed)
    shown = rng.choice(len(examples), size=min(NUM_SHOWN, len(examples)), replace=False)
    drawn = {
      "predictions": grid(shown, "predictions", "Random frames, predicted character"),
      "confusion_matrix": plots.confusion_matrix(
        np.asarray(report["confusion_matrix"]),
        names,
        out / "confusion_matrix.png",
        f"{report['name']}: accuracy {report['accuracy']:.1%}, rows sum to 1",
      ),
    }
    wrong = np.flatnonzero(predicted != examples.labels)
    if len(wrong):
      shown = rng.choice(wrong, size=min(MAX_MISMATCHES, len(wrong)), replace=False)
      title = (
        f"{len(wrong)} mismatches of {len(examples)} frames ({len(shown)} shown; "
        "Grad-CAM: where the answer came from)"
      )
      drawn["mismatches"] = grid(shown, "mismatches", title)
    return drawn


class Validation(Classification):
  """The run's own validation split, its files checked again
  (`type="validation"`)."""

  def read(self) -> Read:
    source = data.create(self.context.config)
    examples = source.validation(self.context.workdir, self.context.report_dir)
    if not len(examples):
      raise errors.UserError(
        f"The validation split of {self.context.workdir} has no image left: see "
        "the log."
      )
    return examples, {}


class Folder(Classification):
  """A folder in either Kaggle layout: `type="folder", dir=...`. Subclasses
  of other listings only say where the files are (`find`)."""

  required = ("dir",)

  def find(self) -> dict[str, list[epath.Path]]:
    """The image files of the entry, by character name ('' if unparseable)."""
    return characters.find_labelled_images(
      self.spec["dir"], f"--config.evals.{self.name}.dir"
    )

  def read(self) -> Read:
    config, cmap = self.context.config, self.context.cmap
    checked = image_files.keep_usable(
      self.find(), self.context.report_dir, config.data.max_image_pixels
    )
    known = {c: checked.images.get(c, []) for c in cmap.names}
    others = {c: [str(p) for p in paths] for c, paths in checked.images.items()}
    return folder.Files.of(known, cmap, checked.sha256), not_known(others, cmap)


def not_known(
  by_character: Mapping[str, list[str]], cmap: characters.CharacterMap
) -> dict[str, list[str]]:
  """The entries of characters the model does not know (never scored)."""
  return {
    c or "<unparseable name>": list(items)
    for c, items in by_character.items()
    if c not in cmap.names and items
  }
