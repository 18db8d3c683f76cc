"""Saying "I don't know": how much an image looks like the characters the
model knows, the score and threshold a run chose on its validation split,
and prediction sets that hold the true character with a chosen probability.

Scores, higher for images like the known characters:
- `max_logit`: the largest raw logit (Vaze et al. 2022, "a good closed-set
  classifier is all you need");
- `max_probability`: the largest calibrated probability;
- `energy`: the log-sum-exp of the raw logits (Liu et al. 2020);
- `knn`: minus the distance from the image's normalised penultimate features
  to its k-th nearest among a bank of training images' (Sun et al. 2022).

At the end of training (`fit`) every score is measured on the validation
split: the characters' images against the validation negatives
(`config.data.negatives`) when the run has any. The knn score is kept unless
another has a higher AUROC by more than twice its standard error (the
validation negatives are few characters: a smaller lead is noise); its
threshold is the lowest at which the images answered are at least 95%
right: the negatives count as wrong answers, weighted to make
`config.data.unknown_share` of all the images (the share of characters it
does not know that the model is expected to meet), however many of them the
validation split holds. A run without negatives keeps the maximum
probability and its 95%-precision threshold. The validation split alone
decides: the unknown characters an evaluation scores are never read.

Prediction sets (split conformal, Angelopoulos and Bates 2021, with the
least-ambiguous set score of Sadinle et al. 2019): an image's set holds every
character whose calibrated probability is at least 1 - q, q the quantile of
the validation images' 1 - p(true character) that the coverage asks for. Over
exchangeable images it holds the true character with at least that
probability, with the fewest characters on average.

Everything is NumPy on the host, kept per checkpoint in
`<workdir>/open_set.json` (`save`, `load`, checked before it is trusted) and
copied into exports.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from simpsons_jax import calibration, errors, files

FILENAME = "open_set.json"
SCORES = ("max_logit", "max_probability", "energy", "knn")
PRECISION = 0.95  # Of the images answered, at validation.
# The k of the k-nearest-neighbour score, and the most training images whose
# features it compares: chosen on held-out characters (docs/results.md).
NEIGHBOUR = 1
BANK_SIZE = 8192
# The score a run keeps unless its validation negatives tell another apart
# better by more than twice the standard error of their AUROC: the one that
# told held-out characters apart best (docs/results.md).
PREFERRED = "knn"
_NEIGHBOUR_BEFORE_RECORDED = 10  # Records without "neighbour" used k = 10.


def knn_score(features: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
  """Minus the distance of each normalised feature row to its k-th nearest
  row of `bank` (normalised too): sqrt(2 - 2 cos)."""
  k = min(k, len(bank))
  cosine = np.asarray(features, np.float32) @ np.asarray(bank, np.float32).T
  kth = -np.partition(-cosine, k - 1, axis=1)[:, k - 1]
  return -np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))


@dataclasses.dataclass(frozen=True)
class Bank:
  """The knn score's reference: normalised penultimate features of training
  images (rows), and the k of the k-th nearest one."""

  features: np.ndarray
  neighbour: int = NEIGHBOUR

  def score(self, features: np.ndarray) -> np.ndarray:
    """The knn score of normalised feature rows against this bank."""
    return knn_score(features, self.features, self.neighbour)


def scores(
  rows: Mapping[str, np.ndarray], temperature: float, bank: Bank | None
) -> dict[str, np.ndarray]:
  """Every score of the rows an evaluation gives (`evaluators.scoring`:
  probabilities, max_logit, logsumexp, features); `knn` only with a bank."""
  found = {
    "max_logit": np.asarray(rows["max_logit"], np.float64),
    "max_probability": calibration.with_temperature(
      rows["probabilities"], temperature
    ).max(-1),
    "energy": np.asarray(rows["logsumexp"], np.float64),
  }
  if bank is not None and len(bank.features):
    found["knn"] = bank.score(rows["features"])
  return found


def score_of(
  name: str, outputs: Mapping[str, np.ndarray], bank: Bank | None = None
) -> np.ndarray:
  """The score `name` of a model's outputs for some images (`trained`'s:
  calibrated probabilities, max_logit, logsumexp, features)."""
  if name == "max_probability":
    return np.asarray(outputs["probabilities"]).max(-1)
  if name == "max_logit":
    return np.asarray(outputs["max_logit"])
  if name == "energy":
    return np.asarray(outputs["logsumexp"])
  if bank is None:
    raise ValueError("the knn score needs the run's feature bank")
  return bank.score(outputs["features"])


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
  """The share of unknowns scoring at least the threshold that keeps `tpr`
  of the knowns (FPR at 95% TPR, lower is better)."""
  threshold = np.quantile(np.asarray(known, np.float64), 1 - tpr)
  return float((np.asarray(unknown) >= threshold).mean())


def oscr(
  known: np.ndarray, correct: np.ndarray, unknown: np.ndarray, points: int = 64
) -> dict[str, Any]:
  """The open-set classification rate curve (Dhamija et al. 2018) of one
  score: at each threshold, the share of known images answered and right
  (`ccr`) against the share of unknown ones answered (`fpr`), `points` of it
  from the highest threshold down, and the area under it."""
  thresholds = np.unique(np.concatenate([known, unknown]))[::-1]
  right = np.asarray(correct, bool)
  ccr = np.asarray([(right & (known >= t)).mean() for t in thresholds])
  fpr = np.asarray([(unknown >= t).mean() for t in thresholds])
  ccr, fpr = np.concatenate([[0.0], ccr]), np.concatenate([[0.0], fpr])
  area = float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))
  shown = np.unique(np.linspace(0, len(ccr) - 1, points).round().astype(int))
  return {
    "fpr": fpr[shown].round(5).tolist(),
    "ccr": ccr[shown].round(5).tolist(),
    "area": area,
  }


def auroc_standard_error(auroc: float, n_known: int, n_unknown: int) -> float:
  """The standard error of an AUROC measured on `n_known` and `n_unknown`
  images (Hanley and McNeil 1982)."""
  q_known, q_unknown = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
  variance = (
    auroc * (1 - auroc)
    + (n_known - 1) * (q_known - auroc**2)
    + (n_unknown - 1) * (q_unknown - auroc**2)
  ) / (n_known * n_unknown)
  return math.sqrt(max(variance, 0.0))


def choose(
  known: Mapping[str, np.ndarray],
  correct: np.ndarray,
  unknown: Mapping[str, np.ndarray] | None,
  unknown_share: float,
  precision: float = PRECISION,
) -> dict[str, Any]:
  """The score and threshold a run answers 'unknown' with, from validation
  scores of its characters' images (`known`, with `correct`: whether each is
  named right) and of its negatives (`unknown`; None when it has none),
  these weighted to make `unknown_share` of the images."""
  if not unknown:
    threshold, answered = calibration.threshold_for_precision(
      known["max_probability"], correct, precision
    )
    return {"score": "max_probability", "threshold": threshold, "answered": answered}
  names = [n for n in known if n in unknown]
  auroc = {n: calibration.auroc(known[n], unknown[n]) for n in names}
  fpr = {n: fpr_at_tpr(known[n], unknown[n]) for n in names}
  best = max(names, key=lambda n: (auroc[n], -fpr[n]))
  n_known, n_unknown = len(known[best]), len(unknown[best])
  if PREFERRED in auroc:
    margin = 2 * auroc_standard_error(auroc[PREFERRED], n_known, n_unknown)
    if auroc[best] - auroc[PREFERRED] <= margin:
      best = PREFERRED
  pooled = np.concatenate([known[best], unknown[best]])
  right = np.concatenate(
    [np.asarray(correct, bool), np.zeros(len(unknown[best]), bool)]
  )
  weight = unknown_share / (1 - unknown_share) * n_known / n_unknown
  weights = np.concatenate([np.ones(n_known), np.full(n_unknown, weight)])
  threshold, _ = calibration.threshold_for_precision(pooled, right, precision, weights)
  return {
    "score": best,
    "threshold": threshold,
    "answered": float((known[best] >= threshold).mean()),
    "negatives_refused": float((unknown[best] < threshold).mean()),
    "unknown_share": unknown_share,
    "auroc": auroc,
    "fpr_at_95_tpr": fpr,
  }


def conformity(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Each image's nonconformity: 1 - the calibrated probability of its true
  character (the least-ambiguous sets of Sadinle et al. 2019)."""
  p = np.asarray(probabilities, np.float64)
  return 1.0 - p[np.arange(len(labels)), labels]


def set_threshold(conformity_scores: np.ndarray, coverage: float) -> float:
  """The conformal quantile for `coverage`: the ceil((n + 1) coverage)-th
  smallest validation nonconformity (1.0, every character, when n is too
  small for the coverage asked)."""
  n = len(conformity_scores)
  rank = math.ceil((n + 1) * coverage)
  if rank > n:
    return 1.0
  return float(np.sort(conformity_scores)[rank - 1])


def coverage_threshold(record: Mapping[str, Any], coverage: float) -> float:
  """The conformal quantile for `coverage` of a checkpoint's record;
  UserError for a run trained before prediction sets."""
  if "conformity" not in record:
    raise errors.UserError(
      f"--coverage={coverage}: this checkpoint has no prediction sets (it was "
      "trained before them): train it again"
    )
  return set_threshold(np.asarray(record["conformity"]), coverage)


def prediction_sets(probabilities: np.ndarray, threshold: float) -> list[np.ndarray]:
  """Per image, the characters (indices, most probable first) whose
  probability is at least 1 - `threshold`: the smallest sets that hold the
  true character as often as the coverage asked (never empty: the most
  probable one at least)."""
  p = np.asarray(probabilities, np.float64)
  order = np.argsort(-p, axis=-1, kind="stable")
  kept = np.take_along_axis(p, order, -1) >= 1.0 - threshold - 1e-12
  sizes = np.maximum(kept.sum(-1), 1)
  return [row[:size] for row, size in zip(order, sizes, strict=True)]


def encode_bank(bank: Bank) -> dict[str, Any]:
  """A feature bank as a record's JSON fields: "bank", its float16 bytes in
  base64 with their shape, and "neighbour"."""
  data = np.asarray(bank.features, np.float16)
  return {
    "bank": {
      "shape": list(data.shape),
      "float16": base64.b64encode(data.tobytes()).decode(),
    },
    "neighbour": bank.neighbour,
  }


def decode_bank(record: Mapping[str, Any]) -> Bank | None:
  """The float32 bank of a record (`encode_bank`'s fields), None without."""
  if "bank" not in record:
    return None
  entry = record["bank"]
  data = np.frombuffer(base64.b64decode(entry["float16"]), np.float16)
  features = data.reshape(entry["shape"]).astype(np.float32)
  return Bank(features, int(record.get("neighbour", _NEIGHBOUR_BEFORE_RECORDED)))


def save(workdir: str | os.PathLike, step: int, record: Mapping[str, Any]) -> None:
  """Adds (or replaces) checkpoint `step`'s record in the workdir's file."""
  records = load(workdir)
  records[str(step)] = dict(record)
  path = files.as_path(workdir) / FILENAME
  files.write_text_atomic(path, json.dumps(records) + "\n")


def load(workdir: str | os.PathLike) -> dict[str, Any]:
  """Every checkpoint's record ({} for a run trained before open_set.json),
  each checked (`checked`)."""
  path = files.as_path(workdir) / FILENAME
  if not path.exists():
    return {}
  fix = "delete it to answer by probability alone, or train the run again"
  records = files.read_json(path, fix)
  if not isinstance(records, dict) or not all(k.isdigit() for k in records):
    raise files.DamagedFileError(f"{path} is damaged (not records by step): {fix}")
  for step, record in records.items():
    checked(record, f"{path} (step {step})", fix)
  return records


def checked(
  record: Any, where: str, fix: str, with_bank: bool = True
) -> dict[str, Any]:
  """`record` if it can be trusted: a known score, a finite threshold,
  conformity scores in [0, 1] and (`with_bank`, for the knn score) a finite
  feature bank; else DamagedFileError naming `where` and `fix`."""

  def damaged(why: str) -> files.DamagedFileError:
    return files.DamagedFileError(f"{where} is damaged ({why}): {fix}")

  if not isinstance(record, dict):
    raise damaged("not a JSON object")
  if record.get("score") not in SCORES:
    raise damaged(f"score {record.get('score')!r} is not one of {', '.join(SCORES)}")
  threshold = record.get("threshold")
  if not isinstance(threshold, int | float) or not math.isfinite(threshold):
    raise damaged(f"threshold {threshold!r} is not a finite number")
  sets = record.get("conformity", [])
  if not isinstance(sets, list) or not all(
    isinstance(c, int | float) and 0 <= c <= 1 + 1e-9 for c in sets
  ):
    raise damaged("nonconformity scores must be numbers in [0, 1]")
  if with_bank and (record["score"] == "knn" or "bank" in record):
    try:
      bank = decode_bank(record)
    except (KeyError, TypeError, ValueError) as e:
      raise damaged(f"its feature bank ({e})") from None
    if bank is None:
      raise damaged("the knn score without its feature bank")
    features = bank.features
    if features.ndim != 2 or not len(features) or not np.isfinite(features).all():
      raise damaged("its feature bank is empty or not finite")
    if not 1 <= bank.neighbour <= len(features):
      raise damaged(f"neighbour {bank.neighbour} is not in 1..{len(features)}")
  return record
