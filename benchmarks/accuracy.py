"""What a config reaches: train it (one run per seed), score the last checkpoint.

  python benchmarks/accuracy.py --config=configs/demo.py --json=docs/results/demo.json
  python benchmarks/accuracy.py --config=configs/strong_small.py --seeds=0 \
      --override=data.dir=../shared/data/frames/train \
      --json=docs/results/strong_small_frames.json

Each seed trains `python main.py --config=... --workdir=<fresh folder>` end to
end (wall time: data checks, compilation and every validation included),
then `--mode=evaluate --checkpoint=latest` scores its validation split; the
figures are the report's (accuracy, macro-F1, balanced accuracy, top-3,
examples). Runs go one after another: never time two things at once.
"""

from __future__ import annotations

import contextlib
import json
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
flags.DEFINE_string("config", None, "The config file, e.g. configs/demo.py.")
flags.DEFINE_multi_string("override", [], "KEY=VALUE for --config.KEY=VALUE.")
flags.DEFINE_list("seeds", ["0"], "One run per seed.")
flags.DEFINE_string(
  "unknown_dir",
  "",
  "Also score these characters the run did not train on (evaluate --unknown_dir), "
  "e.g. the data folder with --override=data.hold_out=...",
)
flags.DEFINE_string("json", "", "Write the results file here.")
flags.DEFINE_string(
  "runs_dir",
  "",
  "Keep each seed's workdir (run_SEED) and evaluation (eval_SEED: report and "
  "figures) in this folder; default: a temporary one, deleted at the end.",
)
flags.mark_flag_as_required("config")

FIGURES = ("accuracy", "macro_f1", "balanced_accuracy", "top3_accuracy")


def _main_py(*args: str) -> None:
  subprocess.run(
    [sys.executable, str(results.ROOT / "main.py"), *args],
    cwd=results.ROOT,
    check=True,
  )


def _one_run(seed: str, workdir: Path) -> dict:
  overrides = [f"--config.{o}" for o in FLAGS.override] + [f"--config.seed={seed}"]
  start = time.perf_counter()
  _main_py(f"--config={FLAGS.config}", f"--workdir={workdir}", *overrides)
  seconds = time.perf_counter() - start
  out = workdir.parent / f"eval_{seed}"
  unknown = [f"--unknown_dir={FLAGS.unknown_dir}"] if FLAGS.unknown_dir else []
  _main_py(
    "--mode=evaluate",
    f"--workdir={workdir}",
    "--checkpoint=latest",
    f"--output_dir={out}",
    *unknown,
  )
  report = json.loads((out / "validation" / "report.json").read_text())
  config = json.loads((workdir / "config.json").read_text())
  return {
    "seed": int(seed),
    **{k: report[k] for k in FIGURES},
    "num_examples": report["num_examples"],
    "characters": len(report["characters"]),
    "steps": report["checkpoint_step"],
    "seconds": seconds,
    "calibration": report["calibration"],
    **({"unknown": report["unknown"]} if "unknown" in report else {}),
    "config": config,
  }


def main(argv: list[str]) -> None:
  del argv
  runs = []
  with contextlib.ExitStack() as stack:
    if FLAGS.runs_dir:
      kept = Path(FLAGS.runs_dir)
      if kept.exists() and any(kept.iterdir()):
        raise app.UsageError(f"--runs_dir={kept} is not empty: give a new folder")
    else:
      kept = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    for seed in FLAGS.seeds:
      runs.append(_one_run(seed, kept / f"run_{seed}"))
      print({k: v for k, v in runs[-1].items() if k != "config"}, flush=True)
  config = runs[0].pop("config")
  for run in runs[1:]:
    run.pop("config")
  median = {k: statistics.median(r[k] for r in runs) for k in (*FIGURES, "seconds")}
  print(f"median of {len(runs)}: {median}")
  if FLAGS.json:
    results.write(
      FLAGS.json,
      "accuracy",
      {"config_file": FLAGS.config, "config": config, "runs": runs, "median": median},
    )


if __name__ == "__main__":
  app.run(main)
