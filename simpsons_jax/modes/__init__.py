"""The modes of main.py (`--mode=NAME`): each a module of this package with
its own flags and a `run(workdir, paths, config)` (main.py's MODES lists them);
the flags several of them share are defined here.

Importing a mode defines its flags and imports nothing heavy: its own work is
imported when it runs, so training never imports serving or video. A flag's
range is checked where it is defined (`check_flag`): a value out of range is
one line naming the flag, the value and what it takes, before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from absl import flags


def check_flag(name: str, ok: Callable[[Any], bool], takes: str) -> None:
  """Registers `ok` as the check of --`name`: absl refuses a value it rejects
  with '--name=value: --name takes `takes`'."""
  flags.register_validator(name, ok, message=f"--{name} takes {takes}")


def finite_at_least(low: float) -> Callable[[float], bool]:
  """A check that a number is finite and at least `low`."""
  return lambda value: math.isfinite(value) and value >= low


def _threshold_ok(value: str) -> bool:
  from simpsons_jax import calibration

  try:
    calibration.parse_threshold(value)
  except ValueError:
    return False
  return True


flags.DEFINE_string(
  "checkpoint", "best", "evaluate/predict/export/serve: 'best', 'latest' or a step."
)
flags.DEFINE_integer("top_k", 3, "predict/export/serve: characters listed per image.")
check_flag("top_k", lambda k: k >= 1, "a whole number of characters, at least 1")
flags.DEFINE_string(
  "threshold",
  "auto",
  "predict/serve: when the answer is 'unknown'. auto: the run's own unknown "
  "score and threshold, chosen on its validation split (never 'unknown' for a "
  "run trained before them); a probability: below this calibrated "
  "probability; auto:precision=P: the lowest probability at which the "
  "validation images answered are at least P right (e.g. auto:precision=0.95).",
)
check_flag(
  "threshold",
  _threshold_ok,
  "auto, a probability in [0, 1] (0.8), or auto:precision=P with P in [0, 1]",
)
flags.DEFINE_float(
  "coverage",
  0.0,
  "evaluate/predict: with a probability P (e.g. 0.9), each image also gets its "
  "prediction set: the fewest characters that hold the true one with "
  "probability P (split conformal on the run's validation split); evaluate "
  "reports the coverage and mean size reached. serve takes ?coverage=P.",
)
check_flag(
  "coverage",
  lambda c: c == 0 or 0 < c < 1,
  "a probability strictly between 0 and 1, e.g. 0.9 (0: no sets)",
)
flags.DEFINE_string(
  "output_dir",
  "",
  "evaluate: write the report, figures and summaries here instead of into "
  "the workdir (for a read-only workdir). predict: where a video's frame "
  "table, segments and timeline go (default: ./predictions). export: "
  "instead of <workdir>/export.",
)
