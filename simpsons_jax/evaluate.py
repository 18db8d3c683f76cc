"""Evaluate a trained workdir: report.json and the notebook's pictures.

Data sets (`evaluators.EVALUATORS`): the run's own validation split
(default), a folder in the Kaggle training layout (`D/<character>/*.jpg`) or
test-set layout (`D/<character>_<N>.jpg`), a split of a prepared TFDS data
set, or any entry of the run's `config.evals`. Images of characters the
model does not know are counted and listed under `skipped`, never scored.
Everything lands in `<workdir>/eval/<name>/` and in TensorBoard under
`tensorboard/eval_<name>`, or under `--output_dir` when the workdir is
read-only.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from simpsons_jax import (
  calibration,
  characters,
  checkpointing,
  data,
  errors,
  evaluators,
  explain,
  files,
  plots,
  sharding,
  summary,
)
from simpsons_jax import trained as trained_run

VALIDATION = "validation"
# The figures evaluate draws, each `<name>.png` in its output folder.
FIGURES = ("predictions", "mismatches", "confusion_matrix", "reliability")
NUM_SHOWN = 9
MAX_MISMATCHES = 16


def run(
  workdir: str | os.PathLike,
  eval_dir: str = "",
  checkpoint: str = "best",
  seed: int = 0,
  output_dir: str | os.PathLike = "",
  unknown_dir: str = "",
) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir`; writes report.json and the figures.

  The report's `calibration` holds the expected calibration error and the
  NLL without and with the checkpoint's temperature (figure
  `reliability.png`). With `unknown_dir` (a folder of characters the run did
  not train on), `unknown` says how well the maximum probability and the
  energy score tell those images from the evaluated ones (AUROC), and how
  many of them the validation-chosen threshold answers 'unknown'.

  `eval_dir` is a folder in either Kaggle layout, the name of one of the
  run's `config.evals`, or `tfds:NAME[:VERSION]/SPLIT`; empty, the run's
  validation split. The numbers come
  from the evaluator the training loop uses (`evaluators`), on the run's
  batch size. They go to `<output_dir or workdir/eval>/<name>/`, and
  TensorBoard's to `<output_dir or workdir>/tensorboard/eval_<name>/`: with
  `output_dir`, nothing is written into `workdir`, which may be read-only.
  """
  workdir = files.as_path(workdir)
  # What the user named is checked before the model loads or a batch is scored.
  name, spec = evaluated(eval_dir, checkpointing.load_config(workdir))
  if spec["type"] == "folder" and eval_dir == spec["dir"]:
    characters.resolve_data_dir(eval_dir, "--eval_dir")
  if unknown_dir:
    characters.resolve_data_dir(unknown_dir, "--unknown_dir")
  files.check_writable(
    files.as_path(output_dir) if output_dir else workdir / "eval",
    "give --output_dir a folder you can write to (the workdir may be read-only)",
  )
  trained = trained_run.load(workdir, checkpoint)
  config, names = trained.config, trained.cmap.names
  out = (files.as_path(output_dir) if output_dir else workdir / "eval") / name
  evaluator = evaluators.create(name, spec, trained.cmap, out, config, workdir)
  mesh = _mesh(config.train.batch_size)
  score = evaluators.scorer(
    mesh, trained.model.apply, len(names), config.test_time_flip
  )
  result, rows = evaluator.run(score, trained.variables, mesh, config, names)
  probs = calibration.with_temperature(rows["probabilities"], trained.temperature)
  result = {
    "checkpoint_step": trained.step,
    **result,
    "calibration": _calibration_report(rows["probabilities"], probs, rows, trained),
  }
  if unknown_dir:
    unknown = evaluators.unknown_examples(unknown_dir, trained.cmap, out, config)
    unknown_rows = evaluators.Evaluator("unknown", unknown).run(
      score, trained.variables, mesh, config, names
    )[1]
    result["unknown"] = _unknown_report(
      probs, rows, unknown_rows, trained, result["calibration"].get("at_95_precision")
    )
  out.mkdir(parents=True, exist_ok=True)
  for stale in FIGURES:  # Another evaluation's; nothing else in `out` is ours.
    (out / f"{stale}.png").unlink(missing_ok=True)
  figures = _figures(trained, evaluator.examples, probs, result, out, seed)
  figures["reliability"] = plots.reliability_diagram(
    calibration.reliability(rows["probabilities"], rows["labels"]),
    calibration.reliability(probs, rows["labels"]),
    out / "reliability.png",
    f"{name}: ECE {result['calibration']['ece']['uncalibrated']:.1%} -> "
    f"{result['calibration']['ece']['calibrated']:.1%} (T = {trained.temperature:.2f})",
  )
  board = (files.as_path(output_dir) if output_dir else workdir) / "tensorboard"
  result = evaluators.write(result, out, board / f"eval_{name}", trained.step, figures)
  _say(result, f"checkpoint step {trained.step} ({checkpoint})", out)
  return result


def _say(result: dict[str, Any], which: str, out: epath.Path) -> None:
  """The headline figures on the console and in the log."""
  calibrated = result["calibration"]["ece"]
  print(
    f"{result['name']}, {which}: accuracy {result['accuracy']:.4f}, macro-F1 "
    f"{result['macro_f1']:.4f} on {result['num_examples']} images; ECE "
    f"{calibrated['uncalibrated']:.4f} -> {calibrated['calibrated']:.4f} "
    f"calibrated (a perfectly calibrated model would measure about "
    f"{calibrated['floor']:.4f} on as many images); report in {out}"
  )
  logging.info(
    "%s: accuracy %.4f, top-3 %.4f, macro-F1 %.4f on %d images (%d skipped); see %s",
    *(result["name"], result["accuracy"], result["top3_accuracy"]),
    *(result["macro_f1"], result["num_examples"], result["skipped"], out),
  )


def evaluated(
  eval_dir: str, config: ml_collections.ConfigDict
) -> tuple[str, dict[str, Any]]:
  """The name and `config.evals`-style entry `--eval_dir` names: '' (the
  validation split), an entry of `config.evals`, `tfds:NAME[:VERSION]/SPLIT`
  or a folder."""
  if not eval_dir:
    return VALIDATION, {"type": "validation"}
  if eval_dir in config.evals:
    return eval_dir, config.evals[eval_dir].to_dict()
  if eval_dir.startswith("tfds:"):
    data_set, _, split = eval_dir[len("tfds:") :].rpartition("/")
    if not data_set or not split:
      raise errors.UserError(f"--eval_dir={eval_dir}: write tfds:NAME[:VERSION]/SPLIT.")
    spec = {"type": "tfds", "name": data_set, "split": split}
    return f"{data_set.replace(':', '_')}_{split}", spec
  return files.as_path(eval_dir).name, {"type": "folder", "dir": eval_dir}


def _calibration_report(
  raw: np.ndarray, calibrated: np.ndarray, rows: dict[str, np.ndarray], trained
) -> dict[str, Any]:
  """ECE (15 bins) and NLL without and with the checkpoint's temperature;
  `ece.floor`: what a perfectly calibrated model would measure here."""
  labels = rows["labels"]
  fitted = calibration.is_fitted(trained.calibration)
  return {
    "temperature": trained.temperature,
    "fitted": fitted,
    "ece": {
      "uncalibrated": calibration.ece(raw, labels),
      "calibrated": calibration.ece(calibrated, labels),
      "floor": calibration.ece_floor(calibrated),
    },
    "nll": {
      "uncalibrated": calibration.nll(raw, labels),
      "calibrated": calibration.nll(calibrated, labels),
    },
    "bins": calibration.ECE_BINS,
    **({"at_95_precision": _answered(calibrated, labels, trained)} if fitted else {}),
  }


def _answered(
  calibrated: np.ndarray, labels: np.ndarray, trained
) -> dict[str, float | None]:
  """At the threshold chosen on the validation split for 95% precision: the
  share of these images answered, and how many of those are right (None when
  none is)."""
  threshold = trained.threshold("auto:precision=0.95")
  answered = calibrated.max(-1) >= threshold
  right = calibrated.argmax(-1) == labels
  return {
    "threshold": threshold,
    "answered": float(answered.mean()),
    "precision": float(right[answered].mean()) if answered.any() else None,
  }


def _unknown_report(
  probs: np.ndarray,
  rows: dict[str, np.ndarray],
  unknown_rows: dict[str, np.ndarray],
  trained,
  at_95: dict[str, Any] | None,
) -> dict[str, Any]:
  """Known (the evaluated images) against unknown characters: AUROC of the
  maximum calibrated probability and of the energy score, and the share of
  unknowns answered 'unknown' at the threshold chosen for 95% precision
  (`at_95`, from the calibration report; None for a run without one)."""
  unknown = calibration.with_temperature(
    unknown_rows["probabilities"], trained.temperature
  )
  report = {
    "known_images": len(probs),
    "unknown_images": len(unknown),
    "auroc": {
      "max_probability": calibration.auroc(probs.max(-1), unknown.max(-1)),
      "energy": calibration.auroc(rows["logsumexp"], unknown_rows["logsumexp"]),
    },
  }
  report["better_score"] = max(report["auroc"], key=report["auroc"].get)
  if at_95:
    report["threshold_for_95_precision"] = at_95["threshold"]
    report["unknowns_answered_unknown"] = float(
      (unknown.max(-1) < at_95["threshold"]).mean()
    )
    report["known_answered"] = at_95["answered"]
  return report


def _mesh(batch_size: int) -> jax.sharding.Mesh:
  """A mesh of as many devices as divide the batch (all, on the trained ones)."""
  devices = jax.devices()
  count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
  return sharding.make_mesh(devices[:count])


def _figures(
  trained, split, probs, result, out: epath.Path, seed: int
) -> dict[str, np.ndarray]:
  """Random predictions and mismatches, each frame with the Grad-CAM map of
  its answer over it, and the confusion matrix, as PNGs."""
  names = trained.cmap.names
  predicted = probs.argmax(axis=1)
  confidence = probs.max(axis=1)
  explain_images = explain.explainer(trained.config, len(names), trained.variables)

  def grid(indices, filename, title):
    images = split.model_inputs(indices, trained.config.data.image_size)
    return plots.prediction_grid(
      split.frames(indices),
      [names[split.labels[i]] for i in indices],
      [names[predicted[i]] for i in indices],
      [confidence[i] for i in indices],
      out / filename,
      title,
      explain_images(images, predicted[indices])["grad_cam"],
    )

  rng = np.random.default_rng(seed)
  shown = rng.choice(len(split), size=min(NUM_SHOWN, len(split)), replace=False)
  figures = {
    "predictions": grid(shown, "predictions.png", "Random frames, predicted character"),
    "confusion_matrix": plots.confusion_matrix(
      np.asarray(result["confusion_matrix"]),
      names,
      out / "confusion_matrix.png",
      f"{result['name']}: accuracy {result['accuracy']:.1%}, rows sum to 1",
    ),
  }
  wrong = np.flatnonzero(predicted != split.labels)
  if len(wrong):
    shown = rng.choice(wrong, size=min(MAX_MISMATCHES, len(wrong)), replace=False)
    title = (
      f"{len(wrong)} mismatches of {len(split)} frames ({len(shown)} shown; "
      "Grad-CAM: where the answer came from)"
    )
    figures["mismatches"] = grid(shown, "mismatches.png", title)
  return figures


def show_data(workdir: str | os.PathLike, count: int = 9, seed: int = 0) -> epath.Path:
  """A grid of random training frames with their characters (the notebook's
  `show_random_characters`), saved as `<workdir>/eval/training_data/`."""
  workdir = files.as_path(workdir)
  config, cmap = trained_run.load_config_and_map(workdir)
  out = workdir / "eval" / "training_data"
  out.mkdir(parents=True, exist_ok=True)
  _, train, _ = data.create(config).load(workdir)
  rng = np.random.default_rng(seed)
  shown = rng.choice(len(train), size=min(count, len(train)), replace=False)
  path = out / "random_characters.png"
  image = plots.frame_grid(
    train.frames(shown),
    [plots.title(cmap.names[train.labels[i]]) for i in shown],
    path,
    suptitle="Random training frames",
  )
  writer = summary.create_writer(workdir / "tensorboard" / "eval_training_data")
  writer.write_images(0, {"random_characters": image[None]})
  writer.close()
  return path
