"""Evaluate a trained workdir: report.json and the notebook's pictures.

Datasets: the run's own validation split (default), a folder in the Kaggle
training layout (`D/<character>/*.jpg`) or in the Kaggle test-set layout
(`D/<character>_<N>.jpg`). Images of characters the model does not know are
counted and listed under `skipped`, never scored. Everything lands in
`<workdir>/eval/<name>/` and in TensorBoard under `tensorboard/eval_<name>`,
or under `--output_dir` when the workdir is read-only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from simpsons_jax import (
  characters,
  files,
  image_files,
  input_pipeline,
  metrics,
  plots,
  predict,
  splits,
  summary,
)

VALIDATION = "validation"
NUM_SHOWN = 9
MAX_MISMATCHES = 16


def report(
  labels: np.ndarray, probs: np.ndarray, names: Sequence[str]
) -> dict[str, Any]:
  """Accuracy, top-3, loss, per-class and macro figures of predictions.

  `labels` (N,) are character ids; `probs` (N, characters) probabilities.
  """
  labels = np.asarray(labels)
  num_classes = len(names)
  predicted = probs.argmax(axis=1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  top3 = np.argsort(-probs, axis=1)[:, :3]
  true_probs = probs[np.arange(len(labels)), labels]
  totals = {
    "loss_sum": -np.log(np.maximum(true_probs, 1e-12)).sum(),
    "correct": (predicted == labels).sum(),
    "top3_correct": (top3 == labels[:, None]).any(axis=1).sum(),
    "count": len(labels),
    "confusion": confusion,
  }
  return {
    "num_examples": len(labels),
    **metrics.summarize(totals),
    "per_class": metrics.per_class_report(confusion, names),
    "characters": list(names),
    "confusion_matrix": confusion.tolist(),
  }


def _dataset(
  trained: predict.TrainedModel, workdir: Path, eval_dir: str, out: Path
) -> tuple[input_pipeline.Split, dict[str, list[str]]]:
  """The examples to score, and the files skipped per unknown character.

  The file checks and skipped-file lists go to `out`.
  """
  config = trained.config
  max_pixels = splits.max_pixels(config)
  if not eval_dir:
    root = input_pipeline.data_dir(config, workdir)
    return splits.validation(workdir, root, trained.cmap, out, max_pixels), {}
  checked = image_files.validate(
    characters.find_labelled_images(eval_dir), out, max_pixels
  )
  images = checked.images
  known = {character: images.get(character, []) for character in trained.cmap.names}
  skipped = {
    character or "<unparseable name>": [str(p) for p in files]
    for character, files in images.items()
    if character not in known
  }
  return input_pipeline.examples(known, trained.cmap), skipped


def run(
  workdir: str | os.PathLike,
  eval_dir: str = "",
  checkpoint: str = "best",
  batch_size: int = 64,
  seed: int = 0,
  output_dir: str | os.PathLike = "",
) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir`; writes report.json and the figures.

  They go to `<output_dir or workdir/eval>/<name>/`, and TensorBoard's to
  `<output_dir or workdir>/tensorboard/eval_<name>/`: with `output_dir`,
  nothing is written into `workdir`, which may be read-only.
  """
  workdir = Path(workdir)
  trained = predict.load(workdir, checkpoint)
  name = Path(eval_dir).name if eval_dir else VALIDATION
  out = (Path(output_dir) if output_dir else workdir / "eval") / name
  split, skipped = _dataset(trained, workdir, eval_dir, out)
  if not len(split):
    raise ValueError(
      f"{eval_dir or 'The validation split'} has no image of the model's "
      f"characters ({', '.join(trained.cmap.names)})."
    )
  batches = input_pipeline.eval_batches(split, trained.config.image_size, batch_size)
  probs = predict.probabilities(trained, batches)
  result = {
    "name": name,
    "checkpoint_step": trained.step,
    **report(split.labels, probs, trained.cmap.names),
    "skipped": sum(len(files) for files in skipped.values()),
    "unknown_characters": {k: len(v) for k, v in skipped.items()},
    "skipped_files": sorted(f for files in skipped.values() for f in files),
  }
  out.mkdir(parents=True, exist_ok=True)
  files.write_text_atomic(out / "report.json", json.dumps(result, indent=2) + "\n")
  figures = _figures(trained, split, probs, result, out, seed)
  board = (Path(output_dir) if output_dir else workdir) / "tensorboard"
  writer = summary.SummaryWriter(board / f"eval_{name}")
  writer.scalars(
    trained.step, {k: result[k] for k in ("accuracy", "top3_accuracy", "macro_f1")}
  )
  for figure, image in figures.items():
    writer.images(trained.step, figure, image[None])
  writer.close()
  logging.info(
    "%s: accuracy %.4f, top-3 %.4f, macro-F1 %.4f on %d images (%d skipped); see %s",
    name,
    result["accuracy"],
    result["top3_accuracy"],
    result["macro_f1"],
    result["num_examples"],
    result["skipped"],
    out,
  )
  return result


def _figures(
  trained, split, probs, result, out: Path, seed: int
) -> dict[str, np.ndarray]:
  """Random predictions, mismatches and the confusion matrix, as PNGs."""
  names = trained.cmap.names
  predicted = probs.argmax(axis=1)
  confidence = probs.max(axis=1)

  def grid(indices, filename, title):
    return plots.prediction_grid(
      [split.paths[i] for i in indices],
      [names[split.labels[i]] for i in indices],
      [names[predicted[i]] for i in indices],
      [confidence[i] for i in indices],
      out / filename,
      title,
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
    title = f"{len(wrong)} mismatches of {len(split)} frames ({len(shown)} shown)"
    figures["mismatches"] = grid(shown, "mismatches.png", title)
  return figures


def show_data(workdir: str | os.PathLike, count: int = 9, seed: int = 0) -> Path:
  """A grid of random training frames with their characters (the notebook's
  `show_random_characters`), saved as `<workdir>/eval/training_data/`."""
  workdir = Path(workdir)
  config, cmap = predict.load_config_and_map(workdir)
  out = workdir / "eval" / "training_data"
  out.mkdir(parents=True, exist_ok=True)
  root = input_pipeline.data_dir(config, workdir)
  train, _ = splits.load_in_use(workdir, root, cmap)
  rng = np.random.default_rng(seed)
  shown = rng.choice(len(train), size=min(count, len(train)), replace=False)
  path = out / "random_characters.png"
  image = plots.frame_grid(
    [train.paths[i] for i in shown],
    [plots.title(cmap.names[train.labels[i]]) for i in shown],
    path,
    suptitle="Random training frames",
  )
  writer = summary.SummaryWriter(workdir / "tensorboard" / "eval_training_data")
  writer.images(0, "random_characters", image[None])
  writer.close()
  return path
