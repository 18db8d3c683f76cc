"""Renders the docs' tables, and the configs' "Measured" lines, from results files.

  python -m benchmarks.report          # rewrite what changed
  python -m benchmarks.report --check  # exit 1 if anything is out of date

Every figure of the README, `docs/results.md` and `docs/performance.md` lies between
`<!-- results: KIND -->` and `<!-- /results -->`, rendered from the files of
`docs/results/` whose `benchmark` is KIND (see `benchmarks/results.py`); a
config file that a results file measured gets a `Measured (...)` paragraph in
its docstring. Hand edits inside those places are overwritten.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCS = ("README.md", "docs/results.md", "docs/performance.md")
BLOCK = re.compile(r"(<!-- results: (\w+) -->\n).*?(<!-- /results -->)", re.S)
# A config docstring's rendered paragraph: up to a blank line or the end.
MEASURED = re.compile(r'\nMeasured \(docs/results/[^\n]*(?:\n(?!\n|""")[^\n]*)*')


def load() -> list[dict[str, Any]]:
  """Every results file, by name, with its file name under `file`."""
  return [
    {**json.loads(path.read_text()), "file": path.name}
    for path in sorted(RESULTS.glob("*.json"))
  ]


def _machine(result: Mapping[str, Any]) -> str:
  machine = result["machine"]
  jax = result["versions"].get("jax", "?")
  return f"{machine['cpu']}, {machine['cores']} cores, jax {jax}, {result['date']}"


def _source(result: Mapping[str, Any], detail: str = "") -> str:
  """The last two cells of a row: where it was measured, and its file."""
  return (
    f"| {_machine(result)}{detail} | [{result['file']}](results/{result['file']}) |"
  )


def _minutes(seconds: float) -> str:
  return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def _changes(result: Mapping[str, Any]) -> list[str]:
  """The config's keys the run's command changed, but its data folder."""
  found = re.findall(r"--override=([\w.]+)=([^ ']+)", result["command"])
  return [f"{key}={value}" for key, value in found if key != "data.dir"]


def _accuracy(results: list[dict[str, Any]]) -> str:
  rows = [
    "| config | data | validation images | accuracy | macro-F1 | balanced accuracy "
    "| wall time | seeds | machine | file |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    config, median, runs = r["config"], r["median"], r["runs"]
    data = config["data"]["dir"] or config["data"]["source"]
    held = "".join(f", `{change}`" for change in _changes(r))
    seeds = " / ".join(f"{run['accuracy']:.1%}" for run in runs)
    rows.append(
      f"| `{r['config_file']}` | `{data}`, {config['data']['image_size']} px, "
      f"{runs[0]['characters']} characters{held} | {runs[0]['num_examples']} "
      f"| **{median['accuracy']:.1%}** | {median['macro_f1']:.3f} "
      f"| {median['balanced_accuracy']:.3f} | {_minutes(median['seconds'])} "
      f"| {', '.join(str(run['seed']) for run in runs)} ({seeds}) " + _source(r)
    )
  return "\n".join(rows)


def _speed(results: list[dict[str, Any]]) -> str:
  rows = [
    "| network | mode | size | batch | images/s (median) | best simpsons_jax / best "
    "peer | machine | file |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    for row in r["results"]:
      rates = row["images_per_second"]
      ours = [v for k, v in rates.items() if k.startswith("simpsons_jax")]
      peers = [v for k, v in rates.items() if not k.startswith("simpsons_jax")]
      ratio = f"{max(ours) / max(peers):.2f}x" if ours and peers else "-"
      rows.append(
        f"| {r['model']} | {row['mode']} | {row['size']} | {row['batch']} | "
        + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items())
        + f" | {ratio} "
        + _source(r, f", {r['rounds']} rounds of {r['window_seconds']:g} s")
      )
  return "\n".join(rows)


def _step_parts(results: list[dict[str, Any]]) -> str:
  rows = []
  for r in results:
    precisions = list(r["parts"])
    rows += [
      f"{r['size']} px, batch {r['batch']}, median of {r['repeats']} calls, on "
      f"{_machine(r)} ([{r['file']}](results/{r['file']})):",
      "",
      "| part | GFLOP | "
      + " | ".join(f"{p}: ms | of which forward | {p}: GFLOP/s" for p in precisions)
      + " |",
      "|---|---|" + "---|---|---|" * len(precisions),
    ]
    by_part = zip(*(r["parts"][p] for p in precisions), strict=True)
    totals = [sum(part["ms"] for part in r["parts"][p]) for p in precisions]
    for parts in by_part:
      cells = [
        f"{part['ms']:.2f} | "
        + (f"{part['forward_ms']:.2f} | " if "forward_ms" in part else "- | ")
        + (f"{part['gflop'] / part['ms'] * 1e3:.0f}" if part["gflop"] else "-")
        for part in parts
      ]
      rows.append(
        f"| {parts[0]['part']} | {parts[0]['gflop']:.2f} | " + " | ".join(cells) + " |"
      )
    steps = [r["whole_step_ms"][p] for p in precisions]
    gflop = sum(part["gflop"] for part in r["parts"][precisions[0]])
    peak = r.get("fma_peak_gflops")
    rates = [
      f"{gflop / step * 1e3:.0f}"
      + (f" (**{gflop / step * 1e3 / peak:.0%}** of the FMA peak)" if peak else "")
      for step in steps
    ]
    rows += [
      "| **the parts together** | | "
      + " | ".join(f"**{total:.1f}** | | " for total in totals)
      + " |",
      f"| **the whole training step** | {gflop:.2f} | "
      + " | ".join(
        f"**{step:.1f}** | | {rate}" for step, rate in zip(steps, rates, strict=True)
      )
      + " |",
      "| the rest (loss, dropout, metrics, glue) | | "
      + " | ".join(
        f"{step - total:.1f} | | " for step, total in zip(steps, totals, strict=True)
      )
      + " |",
      "",
    ]
    if peak:
      rows += [
        f"The FMA peak: {peak:.0f} GFLOP/s in float32 on all "
        f"{r['machine']['cores']} cores, measured (`benchmarks/fma_peak.py`); "
        "bfloat16's dot products double it.",
        "",
      ]
    rows += _onednn_passes(r, precisions)
  return "\n".join(rows).rstrip()


def _onednn_passes(r: dict[str, Any], precisions: list[str]) -> list[str]:
  """oneDNN's own account of its convolutions in the whole step, by pass."""
  passes = r.get("onednn_passes_ms")
  if not passes:
    return []
  names = [k for k in passes[precisions[0]][0] if k != "part"]
  rows = [
    "oneDNN's convolutions inside the whole step, ms by pass (the median step's, "
    "`ONEDNN_VERBOSE=profile_exec`):",
    "",
    "| block | " + " | ".join(f"{p}: {n}" for p in precisions for n in names) + " |",
    "|---|" + "---|" * (len(precisions) * len(names)),
  ]
  for blocks in zip(*(passes[p] for p in precisions), strict=True):
    cells = [f"{block[n]:.2f}" for block in blocks for n in names]
    rows.append(f"| {blocks[0]['part']} | " + " | ".join(cells) + " |")
  return [*rows, ""]


def _serve_load(results: list[dict[str, Any]]) -> str:
  rows = [
    "| `--max_batch` | requests/s | p50 | p99 | memory (start / peak / end) "
    "| clients | machine | file |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    for row in r["results"]:
      rss = row["rss_mb"]
      rows.append(
        f"| {row['max_batch']} | {row['requests_per_second']:.0f} "
        f"| {row['p50_ms']:.0f} ms | {row['p99_ms']:.0f} ms "
        f"| {rss['start']:.0f} / {rss['peak']:.0f} / {rss['end']:.0f} MB "
        f"| {r['clients']} " + _source(r)
      )
  return "\n".join(rows)


def _floor(ece: dict[str, float], images: int) -> str:
  """The ECE a perfectly calibrated model would measure, where the file has it."""
  return f"{ece['floor']:.2%} on {images}" if "floor" in ece else f"{images} images"


def _calibration(results: list[dict[str, Any]]) -> str:
  rows = [
    "| config | data | temperature | ECE before -> after (a perfectly calibrated "
    "model's, on as many images) | NLL before -> after "
    "| threshold for 95% precision: coverage | unknown characters: AUROC (max "
    "probability / energy), answered 'unknown' | file |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    for run in r["runs"]:
      if "calibration" not in run:
        continue
      c, u = run["calibration"], run.get("unknown")
      held = r["config"]["data"].get("hold_out") or []
      unknown = (
        f"{u['auroc']['max_probability']:.3f} / {u['auroc']['energy']:.3f}, "
        f"{u.get('unknowns_answered_unknown', float('nan')):.1%} of "
        f"{u['unknown_images']} ({', '.join(held)})"
        if u
        else "not measured"
      )
      at_95 = c.get("at_95_precision") or (
        {"threshold": u["threshold_for_95_precision"], "answered": u["known_answered"]}
        if u and "known_answered" in u
        else None
      )
      coverage = f"{at_95['threshold']:.3f}: {at_95['answered']:.1%}" if at_95 else "-"
      rows.append(
        f"| `{r['config_file']}`{''.join(f' `{c}`' for c in _changes(r))} "
        f"seed {run['seed']} "
        f"| {r['config']['data']['dir'] or r['config']['data']['source']} "
        f"| {c['temperature']:.3f} "
        f"| {c['ece']['uncalibrated']:.2%} -> **{c['ece']['calibrated']:.2%}** "
        f"({_floor(c['ece'], run['num_examples'])}) "
        f"| {c['nll']['uncalibrated']:.3f} -> {c['nll']['calibrated']:.3f} "
        f"| {coverage} | {unknown} | [{r['file']}](results/{r['file']}) |"
      )
  return "\n".join(rows)


def _how_sure(results: list[dict[str, Any]]) -> str:
  """The README's lines: each calibrated run's figures, linked to its file
  (but the runs that compare precisions: docs/results.md's)."""
  lines = []
  for r in results:
    if any(change.startswith("train.dtype=") for change in _changes(r)):
      continue
    for run in r["runs"]:
      if "calibration" not in run:
        continue
      c, u = run["calibration"], run.get("unknown")
      data = r["config"]["data"]["dir"] or r["config"]["data"]["source"]
      changed = [c for c in _changes(r) if not c.startswith("data.hold_out=")]
      line = (
        f"- `{r['config_file']}`{''.join(f' `--config.{c}`' for c in changed)} "
        f"on {Path(data).parent.name or data} "
        f"({run['num_examples']} validation images, accuracy {run['accuracy']:.1%}): "
        f"ECE {c['ece']['uncalibrated']:.1%} -> {c['ece']['calibrated']:.1%}"
      )
      if "floor" in c["ece"]:
        line += f" (a perfectly calibrated model would measure {c['ece']['floor']:.1%})"
      if "at_95_precision" in c:
        answered = c["at_95_precision"]["answered"]
        line += f"; the 95%-precision threshold answers {answered:.0%}"
      if u and "known_answered" in u:
        held = " and ".join(r["config"]["data"]["hold_out"])
        line += (
          f"; {held} held out: AUROC {u['auroc']['max_probability']:.3f} (maximum "
          f"probability) / {u['auroc']['energy']:.3f} (energy), "
          f"{u['unknowns_answered_unknown']:.0%} of them answered 'unknown' at the "
          f"95%-precision threshold, which answers {u['known_answered']:.0%} of the "
          "known"
        )
      lines.append(f"{line} ([{r['file']}](docs/results/{r['file']})).")
  return "\n".join(lines)


def _open_set(results: list[dict[str, Any]]) -> str:
  """Per held-out pair, the runs without and with negatives: accuracy on the
  known characters, the run's own unknown score (chosen on validation), its
  AUROC and FPR at 95% TPR on the pair, the pair answered 'unknown', and the
  90% prediction sets; then the means."""
  rows = [
    "| held out | negatives | known accuracy | the run's score | AUROC | FPR@95 "
    "| answered 'unknown' | 90% sets: coverage, size | file |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    for run in r["runs"]:
      u, score = run["unknown"], run["unknown"]["score"]
      negatives = ", ".join(run["negative_characters"]) if run["negatives"] else "none"
      rows.append(
        f"| {run['pair'].replace('+', ', ')} | {negatives} | {run['accuracy']:.1%} "
        f"| {score} | {u['auroc'][score]:.3f} | {u['fpr_at_95_tpr'][score]:.1%} "
        f"| {u['unknowns_answered_unknown']:.1%} "
        f"| {run['sets']['coverage']:.1%}, {run['sets']['mean_size']:.2f} "
        f"| [{r['file']}](results/{r['file']}) |"
      )
    for kind, s in r["summary"].items():
      rows.append(
        f"| **mean** ({len(r['runs']) // 2} pairs) | {kind.replace('_', ' ')} "
        f"| {s['mean_accuracy']:.1%} | | **{s['mean_auroc']:.3f}** (min "
        f"{s['min_auroc']:.3f}) | | {s['mean_answered_unknown']:.1%} "
        f"| {s['mean_set_coverage']:.1%}, {s['mean_set_size']:.2f} "
        f"| {_machine(r)} |"
      )
  return "\n".join(rows)


def _open_set_summary(results: list[dict[str, Any]]) -> str:
  """The README's lines: the means over the pairs, without and with negatives."""
  lines = []
  for r in results:
    for kind, s in r["summary"].items():
      lines.append(
        f"- `{r['config_file']}` at 28 px, {kind.replace('_', ' ')}: mean AUROC "
        f"{s['mean_auroc']:.3f} (lowest {s['min_auroc']:.3f}) with the run's own "
        f"score, {s['mean_answered_unknown']:.0%} of the held-out characters "
        f"answered 'unknown', known accuracy {s['mean_accuracy']:.1%}; 90% "
        f"prediction sets cover {s['mean_set_coverage']:.1%} with "
        f"{s['mean_set_size']:.2f} characters on average "
        f"([{r['file']}](docs/results/{r['file']}))."
      )
  return "\n".join(lines)


def _open_set_sweep(
  setting: str, value: Callable[[dict[str, Any]], str], results: list[dict[str, Any]]
) -> str:
  """One setting of the runs with negatives swept, as their validation splits
  judged it (the choice) and as the held-out characters did (never looked at
  for it); `value` names a run's setting."""
  rows = [
    f"| {setting} | AUROC on the runs' own validation negatives "
    "| AUROC on the held-out pairs (lowest) | known accuracy | file |",
    "|---|---|---|---|---|",
  ]
  for r in results:
    for run in r["sweep"]:
      rows.append(
        f"| {value(run)} | {run['mean_validation_auroc']:.3f} "
        f"| {run['mean_auroc']:.3f} ({run['min_auroc']:.3f}) "
        f"| {run['mean_accuracy']:.1%} | [{r['file']}](results/{r['file']}) |"
      )
  return "\n".join(rows)


def _open_set_dev(results: list[dict[str, Any]]) -> str:
  """Runs on the development pairs: each score's mean AUROC on the held-out
  pairs, the score each run's validation negatives told apart best, and the
  pairs answered 'unknown' at the threshold chosen then."""
  scores = list(results[0]["runs"][0]["unknown"]["auroc"]) if results else []
  rows = [
    f"| development runs | AUROC on the held-out pairs: {', '.join(scores)} "
    "| best on the validation negatives | answered 'unknown' | file |",
    "|---|---|---|---|---|",
  ]
  for r in results:
    runs = r["runs"]
    auroc = ", ".join(
      f"{statistics.mean(run['unknown']['auroc'][n] for run in runs):.3f}"
      for n in scores
    )
    picked = ", ".join(run["validation_choice"]["score"] for run in runs)
    answered = statistics.mean(
      run["unknown"]["unknowns_answered_unknown"] for run in runs
    )
    rows.append(
      f"| `{r['setting']}` | {auroc} | {picked} | {answered:.1%} "
      f"| [{r['file']}](results/{r['file']}) |"
    )
  return "\n".join(rows)


def _open_set_seeds(results: list[dict[str, Any]]) -> str:
  """The same runs with other seeds: each held-out pair's AUROC (the run's own
  score) per seed and its range, and every seed's mean and lowest pair."""
  rows = []
  for r in results:
    seeds = r["seeds"]
    pairs = list(seeds[0]["auroc"])
    rows += [
      "| held-out pair | "
      + " | ".join(f"seed {s['seed']}" for s in seeds)
      + " | range | file |",
      "|---" * (len(seeds) + 3) + "|",
    ]
    for pair in pairs:
      found = [s["auroc"][pair] for s in seeds]
      rows.append(
        f"| {pair} | "
        + " | ".join(f"{a:.3f}" for a in found)
        + f" | {max(found) - min(found):.3f} | [{r['file']}](results/{r['file']}) |"
      )
    means = [statistics.mean(s["auroc"].values()) for s in seeds]
    lowest = [min(s["auroc"].values()) for s in seeds]
    rows.append(
      "| mean (lowest) | "
      + " | ".join(f"{m:.3f} ({low:.3f})" for m, low in zip(means, lowest, strict=True))
      + f" | {max(means) - min(means):.3f} | [{r['file']}](results/{r['file']}) |"
    )
  return "\n".join(rows)


def _open_set_share(results: list[dict[str, Any]]) -> str:
  """The threshold each `data.unknown_share` chooses on validation: the known
  images it refuses, and the held-out pairs it answers 'unknown' (means)."""
  rows = [
    "| `data.unknown_share` | known validation images refused "
    "| held-out pairs answered 'unknown' (lowest) | file |",
    "|---|---|---|---|",
  ]
  for r in results:
    for s in r["sweep"]:
      rows.append(
        f"| {s['unknown_share']:g} | {s['mean_known_refused']:.1%} "
        f"| {s['mean_held_out_answered_unknown']:.1%} "
        f"({s['min_held_out_answered_unknown']:.1%}) "
        f"| [{r['file']}](results/{r['file']}) |"
      )
  return "\n".join(rows)


def _setting_and_pairs(run: dict[str, Any]) -> str:
  return f"{run['setting']} ({len(run['pairs'])})"


# Each block's table, and the benchmark whose results files it reads.
TABLES: dict[str, Callable[[list[dict[str, Any]]], str]] = {
  "calibration": _calibration,
  "open_set": _open_set,
  "open_set_summary": _open_set_summary,
  "open_set_weights": functools.partial(
    _open_set_sweep,
    "`train.negatives_weight`",
    lambda run: f"{run['negatives_weight']:g}",
  ),
  "open_set_batch": functools.partial(
    _open_set_sweep,
    "`train.batch_size`, `optim.learning_rate`, `train.negatives_weight`",
    lambda run: (
      f"{run['batch_size']}, {run['learning_rate']:g}, {run['negatives_weight']:g}"
    ),
  ),
  "open_set_tried": functools.partial(
    _open_set_sweep,
    "what was tried (held-out pairs)",
    _setting_and_pairs,
  ),
  "open_set_final_layer": functools.partial(
    _open_set_sweep,
    "the final layer or its loss (held-out pairs)",
    _setting_and_pairs,
  ),
  "open_set_dev": _open_set_dev,
  "open_set_share": _open_set_share,
  "open_set_seeds": _open_set_seeds,
  "how_sure": _how_sure,
  "accuracy": _accuracy,
  "speed": _speed,
  "step_parts": _step_parts,
  "serve_load": _serve_load,
}


def render_doc(text: str, results: list[dict[str, Any]]) -> str:
  """`text` with every results block rendered."""

  def block(match: re.Match) -> str:
    kind = match[2]
    if kind not in TABLES:
      raise ValueError(f"Unknown results block {kind!r}; known: {', '.join(TABLES)}.")
    source = {
      "calibration": "accuracy",
      "how_sure": "accuracy",
      "open_set_summary": "open_set",
    }.get(kind, kind)
    chosen = [r for r in results if r["benchmark"] == source]
    return f"{match[1]}{TABLES[kind](chosen)}\n{match[3]}"

  return BLOCK.sub(block, text)


def render_config(text: str, result: Mapping[str, Any]) -> str:
  """A config file's source with its docstring's Measured paragraph."""
  median, runs = result["median"], result["runs"]
  data = result["config"]["data"]["dir"] or result["config"]["data"]["source"]
  paragraph = (
    f"Measured (docs/results/{result['file']}, rendered): "
    f"{median['accuracy']:.1%} validation accuracy, macro-F1 "
    f"{median['macro_f1']:.3f}, on {runs[0]['num_examples']} validation images "
    f"of {data}, in {_minutes(median['seconds'])} end to end on "
    f"{result['machine']['cpu']}, {result['machine']['cores']} cores "
    f"(median of seeds {', '.join(str(r['seed']) for r in runs)})."
  )
  paragraph = "\n" + textwrap.fill(paragraph, width=80, break_on_hyphens=False)
  if MEASURED.search(text):
    return MEASURED.sub(lambda _: paragraph, text, count=1)
  return text.replace('"""\n', paragraph + '\n"""\n', 1)


def _as_shipped(result: Mapping[str, Any]) -> bool:
  """Whether a run measured its config as shipped (its data folder aside):
  only such a run speaks for the config (one holding characters out, or with
  a larger validation split, measures something else)."""
  return not _changes(result)


def rendered() -> dict[Path, str]:
  """Every file the results decide, as it should read."""
  results = load()
  out = {ROOT / doc: render_doc((ROOT / doc).read_text(), results) for doc in DOCS}
  for result in results:
    if result["benchmark"] == "accuracy" and _as_shipped(result):
      path = ROOT / result["config_file"]
      out[path] = render_config(out.get(path, path.read_text()), result)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="Only say what is stale.")
  args = parser.parse_args(argv)
  stale = [path for path, text in rendered().items() if path.read_text() != text]
  for path in stale:
    if args.check:
      print(f"{path.relative_to(ROOT)} is stale: run python -m benchmarks.report")
    else:
      path.write_text(rendered()[path])
      print(f"rendered {path.relative_to(ROOT)}")
  return 1 if args.check and stale else 0


if __name__ == "__main__":
  sys.exit(main())
