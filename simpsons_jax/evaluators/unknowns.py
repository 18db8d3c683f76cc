"""How well the model tells characters it never learned from those it knows
(`type="unknowns"`, `dir=...`: a folder in either Kaggle layout whose
characters the run did not train on, e.g. its data folder with
`--config.data.hold_out`).

Against a known set (`known_dir=...`; default: the run's validation split):
the AUROC and the FPR at 95% TPR of every unknown score (`open_set.SCORES`;
the knn score with the run's feature bank), and with the score and threshold
the run chose on its validation split (`score`, `threshold`), the share of
unknown images answered 'unknown' and of known ones answered. Nothing here is
chosen on the unknown images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from simpsons_jax import (
  calibration,
  characters,
  errors,
  evaluators,
  image_files,
  open_set,
)
from simpsons_jax.data import folder
from simpsons_jax.evaluators import base, scoring


class Unknowns(base.Evaluator):
  """See the module docstring."""

  required = ("dir",)

  def __init__(
    self,
    name: str,
    spec: Mapping[str, Any],
    context: base.Context,
    flag: str = "",
  ):
    super().__init__(name, spec, context)
    self.known = evaluators.known_set(spec, "known_dir", context, name)
    self.flag = flag or f"--config.evals.{name}.dir"  # Where `dir` was given.
    self._unknown: scoring.Data | None = None

  @property
  def unknown(self) -> scoring.Data:
    """The unknown characters' images, read at first use."""
    if self._unknown is None:
      examples = unknown_examples(
        self.spec["dir"],
        self.context.cmap,
        self.context.report_dir,
        self.context.config.data.max_image_pixels,
        self.flag,
      )
      self._unknown = scoring.Data(examples, self.context.config)
    return self._unknown

  def run(self, model: scoring.Model, draw_in: epath.Path | None = None) -> base.Result:
    del draw_in  # Nothing drawn.
    bank = open_set.decode_bank(model.open_set)
    known_rows = model.outputs(self.known.data)[1]
    known = open_set.scores(known_rows, model.temperature, bank)
    unknown = open_set.scores(model.outputs(self.unknown)[1], model.temperature, bank)
    report: dict[str, Any] = {
      "known_images": len(known["energy"]),
      "unknown_images": len(unknown["energy"]),
      "auroc": {n: calibration.auroc(known[n], unknown[n]) for n in known},
      "fpr_at_95_tpr": {n: open_set.fpr_at_tpr(known[n], unknown[n]) for n in known},
    }
    rule = _rule(model)
    if rule is not None:  # What the run answers: its own choice, on validation.
      name, threshold = rule
      correct = known_rows["probabilities"].argmax(-1) == known_rows["labels"]
      report |= {
        "score": name,
        "threshold": threshold,
        "unknowns_answered_unknown": float((unknown[name] < threshold).mean()),
        "known_answered": float((known[name] >= threshold).mean()),
        "oscr": open_set.oscr(known[name], correct, unknown[name]),
      }
    scalars = {f"auroc.{k}": v for k, v in report["auroc"].items()}
    if "unknowns_answered_unknown" in report:
      scalars["unknowns_answered_unknown"] = report["unknowns_answered_unknown"]
    return base.Result(scalars, report)


def _rule(model: scoring.Model) -> tuple[str, float] | None:
  """The score and threshold the run answers 'unknown' with: chosen on its
  validation split (`open_set`), or for a run before those, the maximum
  probability at the 95%-precision threshold; None without calibration."""
  if model.open_set:
    return model.open_set["score"], float(model.open_set["threshold"])
  if calibration.is_fitted(model.calibration):
    return "max_probability", model.threshold("auto:precision=0.95")
  return None


def unknown_examples(
  folder_dir: str,
  cmap: characters.CharacterMap,
  report_dir: epath.Path | None,
  max_pixels: int,
  flag: str = "--unknown_dir",
) -> folder.Files:
  """The images of a folder (either Kaggle layout) of characters the model
  does not know, each labelled 0 (their label is never scored)."""
  checked = image_files.keep_usable(
    characters.find_labelled_images(folder_dir, flag), report_dir, max_pixels
  )
  paths = [
    p for c, found in checked.images.items() if c not in cmap.names for p in found
  ]
  if not paths:
    raise errors.UserError(
      f"{folder_dir} has no image of a character the model does not know "
      f"(it knows {', '.join(cmap.names)}): give {flag} a folder of others."
    )
  return folder.Files(
    np.asarray([str(p) for p in paths], dtype=str),
    np.zeros(len(paths), np.int32),
    tuple(checked.sha256[p] for p in paths),
  )
