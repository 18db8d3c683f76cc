"""The modes of main.py (`--mode=NAME`): each a module of this package with
its own flags and a `run(workdir, paths, config)` (main.py's MODES lists them);
the flags several of them share are defined here.

Importing a mode defines its flags and imports nothing heavy: its own work is
imported when it runs, so training never imports serving or video.
"""

from __future__ import annotations

from absl import flags

flags.DEFINE_string(
  "checkpoint", "best", "evaluate/predict/export/serve: 'best', 'latest' or a step."
)
flags.DEFINE_integer("top_k", 3, "predict/export/serve: characters listed per image.")
flags.DEFINE_string(
  "threshold",
  "0",
  "predict/serve: below this (calibrated) probability the answer is "
  "'unknown'; auto:precision=P picks, on the validation split, the lowest "
  "at which the images answered are at least P right (e.g. auto:precision=0.95).",
)
flags.DEFINE_string(
  "output_dir",
  "",
  "evaluate: write the report, figures and summaries here instead of into "
  "the workdir (for a read-only workdir). predict: where a video's frame "
  "table, segments and timeline go (default: ./predictions). export: "
  "instead of <workdir>/export.",
)
