"""Scoring a model on examples: the one code path of every evaluator.

`scorer` is the one jitted function that turns a padded batch into metric
sums (loss, correct, top-3, count, confusion matrix) over its real examples,
and every example's probabilities and energy score (one model pass: the
figures, the calibration and the unknowns reuse them); `accumulate` adds them
up over batches and `metrics.summarize` turns the totals into figures. `Data`
holds a data set's padded batches, made once; `Model` is the model under
evaluation, which scores each `Data` once however many evaluators read it.
`write` puts an evaluator's report and pictures in its folder and TensorBoard.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from simpsons_jax import (
  calibration,
  files,
  inference,
  metrics,
  sharding,
  summary,
)
from simpsons_jax.data import core

REPORT_FILENAME = "report.json"


def batch_scores(
  apply_fn: Callable,
  variables: Any,
  batch: Mapping[str, jax.Array],
  num_classes: int,
  flip: bool = False,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Metric sums over the real (mask=1) examples of a padded batch, and each
  row's softmax probabilities, label, largest raw logit, energy score,
  normalised penultimate features and the mask. Negatives (label -1) count
  in no sum."""
  logits, raw, features = inference.outputs(apply_fn, variables, batch["image"], flip)
  labels = batch["label"]
  mask = batch["mask"] * (labels >= 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(
    logits, jnp.maximum(labels, 0)
  )
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
    "max_logit": raw.max(axis=-1),
    "features": features,
    "mask": batch["mask"],
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
  score: Callable, variables: Any, batches: list[core.Batch], mesh: Mesh
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


class Data:
  """Examples to score, with their padded batches made at first use (the
  decoded images cached) and kept: an evaluator run every epoch decodes once."""

  def __init__(self, examples: core.Examples, config: ml_collections.ConfigDict):
    self.examples, self._config = examples, config
    self._batches: list[core.Batch] | None = None

  def __len__(self) -> int:
    return len(self.examples)

  def batches(self) -> list[core.Batch]:
    if self._batches is None:
      self._batches = core.eval_batches(
        self.examples,
        self._config.data.image_size,
        self._config.train.batch_size,
        self._config.data.cache_dir,
        jax.process_index(),
        jax.process_count(),
      )
    return self._batches


class Model:
  """The model under evaluation: the jitted `scorer`, the variables of one
  checkpoint (or of the training state now), its calibration record ({}
  or `calibration.not_fitted`: T = 1) and its unknown score and threshold
  (`open_set`; {} without). Each `Data` is scored once."""

  def __init__(
    self,
    score: Callable,
    variables: Any,
    mesh: Mesh,
    step: int,
    calibration_record: Mapping[str, Any] | None = None,
    open_set_record: Mapping[str, Any] | None = None,
  ):
    self.score, self.variables, self.mesh, self.step = score, variables, mesh, step
    self.calibration = dict(calibration_record or {})
    self.open_set = dict(open_set_record or {})
    self._scored: dict[int, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}

  @property
  def temperature(self) -> float:
    return float(self.calibration.get("temperature", 1.0))

  def outputs(self, data: Data) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metric totals and the rows (`accumulate`) of `data`, scored once."""
    if id(data) not in self._scored:
      self._scored[id(data)] = accumulate(
        self.score, self.variables, data.batches(), self.mesh
      )
    return self._scored[id(data)]

  def calibrated(self, data: Data) -> np.ndarray:
    """The probabilities of `data`'s examples at the checkpoint's temperature."""
    return calibration.with_temperature(
      self.outputs(data)[1]["probabilities"], self.temperature
    )

  def threshold(self, value: str) -> float:
    """`--threshold` as a probability (`calibration.threshold`)."""
    return calibration.threshold(value, self.calibration)[0]


def write(
  result: Mapping[str, Any],
  out: epath.Path,
  board: epath.Path,
  step: int,
  images: Mapping[str, np.ndarray] | None = None,
  scalars: Mapping[str, float] | None = None,
) -> dict[str, Any]:
  """Writes and returns `out/report.json`: `result`, written last, with the
  PNG pictures beside it (`images`, each written whole before as
  `<name>.png`) listed with their SHA-256, so that a report and its pictures
  are known to be one evaluation's; `scalars` (the named figures) in the
  report, and with `images` in TensorBoard under `board`."""
  out.mkdir(parents=True, exist_ok=True)
  drawn = [out / f"{tag}.png" for tag in sorted(images or {})]
  figures = {
    path.name: hashlib.sha256(path.read_bytes()).hexdigest()
    for path in drawn
    if path.exists()
  }
  report = {**result, "scalars": dict(scalars or {}), "figures": figures}
  files.write_text_atomic(out / REPORT_FILENAME, json.dumps(report, indent=2) + "\n")
  writer = summary.create_writer(board)
  writer.write_images(step, {tag: image[None] for tag, image in (images or {}).items()})
  writer.write_scalars(step, dict(scalars or {}))
  writer.close()
  return report
