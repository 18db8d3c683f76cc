"""How well the model tells characters it never learned from those it knows
(`type="unknowns"`, `dir=...`: a folder in either Kaggle layout whose
characters the run did not train on, e.g. its data folder with
`--config.data.hold_out`).

Against a known set (`known_dir=...`; default: the run's validation split):
the AUROC of the maximum calibrated probability and of the energy score, and
for a calibrated checkpoint the share of unknown images the threshold chosen
on validation for 95% precision answers 'unknown'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from simpsons_jax import calibration, characters, errors, evaluators, image_files
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
    known_rows = model.outputs(self.known.data)[1]
    unknown_rows = model.outputs(self.unknown)[1]
    known, unknown = model.calibrated(self.known.data), model.calibrated(self.unknown)
    report: dict[str, Any] = {
      "known_images": len(known),
      "unknown_images": len(unknown),
      "auroc": {
        "max_probability": calibration.auroc(known.max(-1), unknown.max(-1)),
        "energy": calibration.auroc(known_rows["logsumexp"], unknown_rows["logsumexp"]),
      },
    }
    report["better_score"] = max(report["auroc"], key=report["auroc"].get)
    if calibration.is_fitted(model.calibration):
      threshold = model.threshold("auto:precision=0.95")
      report["threshold_for_95_precision"] = threshold
      report["unknowns_answered_unknown"] = float((unknown.max(-1) < threshold).mean())
      report["known_answered"] = float((known.max(-1) >= threshold).mean())
    scalars = {f"auroc.{k}": v for k, v in report["auroc"].items()}
    if "unknowns_answered_unknown" in report:
      scalars["unknowns_answered_unknown"] = report["unknowns_answered_unknown"]
    return base.Result(scalars, report)


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
