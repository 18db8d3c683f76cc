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

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from simpsons_jax import (
  characters,
  checkpointing,
  data,
  errors,
  evaluators,
  files,
  open_set,
  plots,
  sharding,
  summary,
)
from simpsons_jax import trained as trained_run
from simpsons_jax.evaluators import calibration, classification, sets, unknowns

VALIDATION = "validation"
# The pictures evaluate draws, each `<name>.png` in its output folder.
FIGURES = ("predictions", "mismatches", "confusion_matrix", "reliability")


def run(
  workdir: str | os.PathLike,
  eval_dir: str = "",
  checkpoint: str = "best",
  output_dir: str | os.PathLike = "",
  unknown_dir: str = "",
  coverage: float = 0.0,
) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir`; writes report.json and the figures.

  `eval_dir` is a folder in either Kaggle layout, the name of one of the
  run's `config.evals`, or `tfds:NAME[:VERSION]/SPLIT`; empty, the run's
  validation split. A set of images gets its classification figures and
  pictures, and its calibration (`calibration` in the report: ECE and NLL
  without and with the checkpoint's temperature, `reliability.png`); with
  `unknown_dir` (a folder of characters the run did not train on),
  `unknown` says how well the model tells those from it; with `coverage`,
  `sets` says how often the conformal prediction sets hold the true
  character there, and their mean size. The evaluators are
  those the training loop runs (`evaluators`), on the run's batch size.
  Everything goes to `<output_dir or workdir/eval>/<name>/`, and
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
  root = files.as_path(output_dir) if output_dir else workdir / "eval"
  files.check_writable(
    root, "give --output_dir a folder you can write to (the workdir may be read-only)"
  )
  trained = trained_run.load(workdir, checkpoint)
  out = root / name
  context = evaluators.Context(trained.config, trained.cmap, workdir, out)
  evaluated_set = evaluators.create(name, spec, context)
  parts: dict[str, evaluators.Evaluator] = {}
  if isinstance(evaluated_set, classification.Classification):
    known = dataclasses.replace(context, known=evaluated_set)
    parts["calibration"] = calibration.Calibration(name, {}, known)
    if unknown_dir:
      where = {"type": "unknowns", "dir": unknown_dir}
      parts["unknown"] = unknowns.Unknowns(name, where, known, flag="--unknown_dir")
    if coverage:
      asked = {"type": "sets", "coverage": coverage}
      parts["sets"] = sets.PredictionSets(name, asked, known)
  if coverage:  # Before any scoring: the run must have its conformity scores.
    open_set.coverage_threshold(trained.open_set, coverage)
  if not isinstance(evaluated_set, classification.Classification) and unknown_dir:
    raise errors.UserError(
      f"--unknown_dir compares with a set of images; --eval_dir={eval_dir} is "
      f"an evaluator of type {spec['type']}: leave one of them out"
    )
  mesh = _mesh(trained.config.train.batch_size)
  score = evaluators.scorer(
    mesh, trained.model.apply, trained.cmap.num_classes, trained.config.test_time_flip
  )
  model = evaluators.Model(
    score, trained.variables, mesh, trained.step, trained.calibration, trained.open_set
  )
  out.mkdir(parents=True, exist_ok=True)
  for stale in FIGURES:  # Another evaluation's; nothing else in `out` is ours.
    (out / f"{stale}.png").unlink(missing_ok=True)
  found = evaluated_set.run(model, out)
  report = {"checkpoint_step": trained.step, **found.report}
  images, figures = dict(found.images), dict(found.scalars)
  for key, part in parts.items():
    more = part.run(model, out)
    report[key] = more.report
    images.update(more.images)
    figures.update({f"{key}.{k}": v for k, v in more.scalars.items()})
  board = (files.as_path(output_dir) if output_dir else workdir) / "tensorboard"
  report = evaluators.write(
    report, out, board / f"eval_{name}", trained.step, images, figures
  )
  _say(report, figures, f"checkpoint step {trained.step} ({checkpoint})", out)
  return report


def _say(
  report: dict[str, Any], figures: dict[str, float], which: str, out: epath.Path
) -> None:
  """The headline figures on the console and in the log."""
  if "accuracy" not in report:
    said = ", ".join(f"{k} {v:.4f}" for k, v in figures.items())
    print(f"{report.get('name', out.name)}, {which}: {said}; report in {out}")
    return
  calibrated = report["calibration"]["ece"]
  print(
    f"{report['name']}, {which}: accuracy {report['accuracy']:.4f}, macro-F1 "
    f"{report['macro_f1']:.4f} on {report['num_examples']} images; ECE "
    f"{calibrated['uncalibrated']:.4f} -> {calibrated['calibrated']:.4f} "
    f"calibrated (a perfectly calibrated model would measure about "
    f"{calibrated['floor']:.4f} on as many images); report in {out}"
  )
  logging.info(
    "%s: accuracy %.4f, top-3 %.4f, macro-F1 %.4f on %d images (%d skipped); see %s",
    *(report["name"], report["accuracy"], report["top3_accuracy"]),
    *(report["macro_f1"], report["num_examples"], report["skipped"], out),
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


def _mesh(batch_size: int) -> jax.sharding.Mesh:
  """A mesh of as many devices as divide the batch (all, on the trained ones)."""
  devices = jax.devices()
  count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
  return sharding.make_mesh(devices[:count])


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
