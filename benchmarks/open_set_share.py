"""How `config.data.unknown_share` moves the 'unknown' threshold a run
chooses: on the runs `benchmarks/open_set.py --runs_dir=DIR` kept.

  python benchmarks/open_set.py --data=../shared/data/simpsons-mnist/train \
      --runs=with_negatives --runs_dir=/tmp/open_set --pairs=...
  python benchmarks/open_set_share.py --runs_dir=/tmp/open_set \
      --json=docs/results/open_set_mnist_share.json

Each run's last checkpoint scores its validation split (the known
characters' images and the negatives') and its held-out pair. For every
share, the unknown score and threshold are chosen as training chooses them
(`open_set.choose`, on validation only); then the share of the known
validation images refused and of the held-out pair answered 'unknown'.
Training does not depend on the share: one run of each pair serves them all.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import results  # noqa: E402
from simpsons_jax import image_files, open_set, trained  # noqa: E402
from simpsons_jax.data import core  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("runs_dir", None, "The --runs_dir of benchmarks/open_set.py.")
flags.DEFINE_list(
  "shares", ["0.05", "0.1", "0.15", "0.2", "0.25", "0.3", "0.4"], "The shares tried."
)
flags.DEFINE_string("json", "", "Write the results file here.")

_outputs = jax.jit(trained.outputs, static_argnums=(0, 3))
_BATCH = 256


def _images(paths: list[Path], size: int) -> np.ndarray:
  """The images at `paths`, resized as training resized them."""
  found = []
  for path in paths:
    verdict, image = image_files.read_image(path)
    if verdict.reason:
      raise ValueError(f"{path}: {verdict.reason}")
    found.append(core.resize(image, size).numpy())
  return np.stack(found)


def _scores(run: trained.TrainedModel, paths: list[Path]) -> dict[str, np.ndarray]:
  """Every unknown score of the images at `paths` (calibrated as the run is)."""
  images = _images(paths, run.config.data.image_size)
  parts = [
    _outputs(
      run.model.apply,
      run.variables,
      images[i : i + _BATCH],
      run.config.test_time_flip,
      run.temperature,
    )
    for i in range(0, len(images), _BATCH)
  ]
  outputs = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
  bank = open_set.decode_bank(run.open_set)
  scores = {n: open_set.score_of(n, outputs, bank) for n in open_set.SCORES}
  return scores | {"predicted": outputs["probabilities"].argmax(-1)}


def one_pair(workdir: Path, shares: list[float]) -> dict:
  """The figures of one kept run at every share."""
  run = trained.load(workdir, "latest")
  data = Path(run.config.data.dir)
  val = json.loads((workdir / "split.json").read_text())["in_use"]["val"]
  known = [k for k in val if k.split("/")[0] in run.cmap.names]
  negatives = [k for k in val if k.split("/")[0] not in run.cmap.names]
  held_out = sorted((workdir.parent / "unknown").glob("*/*"))
  known_scores = _scores(run, [data / k for k in known])
  negative_scores = _scores(run, [data / k for k in negatives])
  held_out_scores = _scores(run, held_out)
  labels = np.asarray([run.cmap.index(k.split("/")[0]) for k in known])
  correct = known_scores.pop("predicted") == labels
  by_share = []
  for share in shares:
    chosen = open_set.choose(known_scores, correct, negative_scores, share)
    score, threshold = chosen["score"], chosen["threshold"]
    answered = known_scores[score] >= threshold
    by_share.append(
      {
        "unknown_share": share,
        "score": score,
        "threshold": threshold,
        "known_refused": float(1 - answered.mean()),
        "known_answered_right": float(correct[answered].mean()),
        "validation_negatives_refused": chosen["negatives_refused"],
        "held_out_answered_unknown": float((held_out_scores[score] < threshold).mean()),
      }
    )
  return {
    "pair": workdir.parent.name,
    "validation": {"known": len(known), "negatives": len(negatives)},
    "held_out_images": len(held_out),
    "by_share": by_share,
  }


def main(argv: list[str]) -> None:
  del argv
  shares = [float(s) for s in FLAGS.shares]
  runs = [
    one_pair(workdir, shares)
    for workdir in sorted(Path(FLAGS.runs_dir).glob("*/with_negatives"))
  ]
  if not runs:
    raise app.UsageError(f"No */with_negatives run under {FLAGS.runs_dir}.")
  sweep = []
  for i, share in enumerate(shares):
    at = [r["by_share"][i] for r in runs]
    held = [a["held_out_answered_unknown"] for a in at]
    sweep.append(
      {
        "unknown_share": share,
        "mean_known_refused": statistics.mean(a["known_refused"] for a in at),
        "mean_held_out_answered_unknown": statistics.mean(held),
        "min_held_out_answered_unknown": min(held),
      }
    )
    print(json.dumps(sweep[-1]))
  if FLAGS.json:
    results.write(
      FLAGS.json,
      "open_set_share",
      {"runs_dir": FLAGS.runs_dir, "runs": runs, "sweep": sweep},
    )


if __name__ == "__main__":
  flags.mark_flag_as_required("runs_dir")
  app.run(main)
