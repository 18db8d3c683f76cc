"""How well a run says "I don't know", over several pairs of characters held
out in turn, with and without negatives.

  python benchmarks/open_set.py --data=../shared/data/simpsons-mnist/train \
      --json=docs/results/open_set_mnist.json --figure=docs/open_set_oscr.png

For each pair held out (`--pairs`), the data folder is rebuilt of links: the
pair (held out: never trained, validated or chosen on), two other characters
cut to `--negative_images` pictures (below `min_images`: the negatives of
`--config.data.negatives=below_min_images`) and the others whole (the known
characters). `--config` trains on it twice, one after the other: without
negatives and with them; `--mode=evaluate --unknown_dir=<the pair>` then
scores each run's last checkpoint: the known characters' validation accuracy,
and per unknown score the AUROC and the FPR at 95% TPR, and with the run's
own score and threshold (chosen on its validation split) the share of the
pair answered 'unknown' and its OSCR curve (drawn with `--figure`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import results  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "A folder in the Kaggle layout (the characters).")
flags.DEFINE_string("config", "configs/strong.py", "The config trained.")
flags.DEFINE_multi_string(
  "override",
  ["data.image_size=28", "train.num_epochs=15"],
  "KEY=VALUE for --config.KEY=VALUE, in both runs.",
)
flags.DEFINE_list(
  "pairs",
  [
    "krusty_the_clown+moe_szyslak",
    "bart_simpson+lisa_simpson",
    "homer_simpson+ned_flanders",
    "marge_simpson+principal_skinner",
  ],
  "The pairs held out in turn, 'a+b'.",
)
flags.DEFINE_integer(
  "negative_images", 400, "Pictures kept of each negative character (< min_images)."
)
flags.DEFINE_integer("min_images", 800, "--config.data.min_images of both runs.")
flags.DEFINE_list(
  "runs",
  ["without", "with_negatives"],
  "Which runs of each pair: without, with_negatives.",
)
flags.DEFINE_string("json", "", "Write the results file here.")
flags.DEFINE_string("figure", "", "Draw the OSCR curves of every run here (PNG).")
flags.DEFINE_string("runs_dir", "", "Keep the runs here (default: a temporary folder).")
flags.mark_flag_as_required("data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# What the results keep of a run's own choice (open_set.json, less its bank).
KEPT = ("score", "threshold", "auroc", "fpr_at_95_tpr", "validation")


def _images(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _link_folder(target: Path, images: list[Path]) -> None:
  target.mkdir(parents=True)
  for image in images:
    (target / image.name).symlink_to(image.resolve())


def layout(data: Path, pair: list[str], place: Path) -> tuple[Path, Path, list[str]]:
  """The data folder (known whole, two negatives cut, the pair), the folder
  of the pair alone, and the negatives' names."""
  names = sorted(p.name for p in data.iterdir() if p.is_dir())
  others = [n for n in names if n not in pair]
  start = sum(names.index(n) for n in pair) % len(others)  # Varies with the pair.
  negatives = [others[(start + i) % len(others)] for i in range(2)]
  for name in names:
    images = _images(data / name)
    if name in negatives:
      images = images[: FLAGS.negative_images]
    _link_folder(place / "data" / name, images)
    if name in pair:
      _link_folder(place / "unknown" / name, images)
  return place / "data", place / "unknown", negatives


def _main_py(*args: str) -> None:
  subprocess.run(
    [sys.executable, str(results.ROOT / "main.py"), *args],
    cwd=results.ROOT,
    check=True,
  )


def one_run(data: Path, unknown: Path, pair: list[str], negatives: bool, workdir: Path):
  """Trains and evaluates one run; its figures."""
  overrides = [f"--config.{o}" for o in FLAGS.override] + [
    f"--config.data.dir={data}",
    f"--config.data.min_images={FLAGS.min_images}",
    f"--config.data.hold_out=({', '.join(repr(p) for p in pair)},)",
    f"--config.data.negatives={'below_min_images' if negatives else ''}",
  ]
  start = time.perf_counter()
  _main_py(f"--config={FLAGS.config}", f"--workdir={workdir}", *overrides)
  seconds = time.perf_counter() - start
  out = workdir.parent / f"{workdir.name}_eval"
  _main_py(
    "--mode=evaluate",
    f"--workdir={workdir}",
    "--checkpoint=latest",
    f"--output_dir={out}",
    f"--unknown_dir={unknown}",
    "--coverage=0.9",
  )
  report = json.loads((out / "validation" / "report.json").read_text())
  chosen = json.loads((workdir / "open_set.json").read_text())
  step = str(report["checkpoint_step"])
  return {
    "negatives": negatives,
    "seconds": seconds,
    "accuracy": report["accuracy"],
    "known_images": report["num_examples"],
    "unknown": report["unknown"],
    "sets": report["sets"],
    "validation_choice": {k: v for k, v in chosen[step].items() if k in KEPT},
  }


def draw(runs: list[dict], path: str) -> None:
  """The OSCR curve of every run's own score, with and without negatives."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.4, 4.8))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  pairs = sorted({run["pair"] for run in runs})
  for run in runs:
    curve = run["unknown"]["oscr"]
    style = "-" if run["negatives"] else "--"
    colour = f"C{pairs.index(run['pair'])}"  # One colour a pair; dashed: no negatives.
    label = (
      f"{run['pair']} ({'negatives' if run['negatives'] else 'none'}: "
      f"{run['unknown']['score']}, area {curve['area']:.2f})"
    )
    ax.plot(curve["fpr"], curve["ccr"], style, color=colour, label=label)
  ax.set_xscale("symlog", linthresh=0.01)
  ax.set_xlabel("false positive rate (unknowns answered)")
  ax.set_ylabel("correct classification rate (knowns)")
  ax.set_title("Open-set classification rate, held-out pairs")
  ax.legend(fontsize=6)
  fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv: list[str]) -> None:
  del argv
  data = Path(FLAGS.data)
  runs = []
  with tempfile.TemporaryDirectory() as scratch:
    root = Path(FLAGS.runs_dir or scratch)
    for pair_text in FLAGS.pairs:
      pair = pair_text.split("+")
      place = root / pair_text
      folder, unknown, negatives = layout(data, pair, place)
      for with_negatives in (False, True):
        name = "with_negatives" if with_negatives else "without"
        if name not in FLAGS.runs:
          continue
        found = one_run(folder, unknown, pair, with_negatives, place / name)
        runs.append({"pair": pair_text, "negative_characters": negatives, **found})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "unknown"}))
  summary = {}
  for with_negatives in (False, True):
    mine = [r for r in runs if r["negatives"] == with_negatives]
    if not mine:
      continue
    own = [r["unknown"]["auroc"][r["unknown"]["score"]] for r in mine]
    # On each run's own validation negatives (none without): what may choose.
    chosen = [r["validation_choice"] for r in mine if "auroc" in r["validation_choice"]]
    summary["with_negatives" if with_negatives else "without"] = {
      "mean_validation_auroc": (
        statistics.mean(c["auroc"][c["score"]] for c in chosen) if chosen else None
      ),
      "mean_auroc": statistics.mean(own),
      "min_auroc": min(own),
      "mean_accuracy": statistics.mean(r["accuracy"] for r in mine),
      "mean_answered_unknown": statistics.mean(
        r["unknown"]["unknowns_answered_unknown"] for r in mine
      ),
      "mean_set_coverage": statistics.mean(r["sets"]["coverage"] for r in mine),
      "mean_set_size": statistics.mean(r["sets"]["mean_size"] for r in mine),
    }
  print(json.dumps(summary, indent=2))
  if FLAGS.figure:
    draw(runs, FLAGS.figure)
  if FLAGS.json:
    results.write(
      FLAGS.json,
      "open_set",
      {
        "config_file": FLAGS.config,
        "data": os.fspath(data),
        "runs": runs,
        "summary": summary,
      },
    )


if __name__ == "__main__":
  app.run(main)
