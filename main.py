"""Train, evaluate and use the Simpsons character classifier.

  python main.py --config=configs/demo.py --workdir=runs/demo
  python main.py --mode=evaluate --workdir=runs/demo [--eval_dir=DIR] [--output_dir=DIR]
  python main.py --mode=predict --workdir=runs/demo frame.jpg folder/ ...
  python main.py --mode=predict --workdir=runs/demo clip.mp4 [--annotate_video=out.mp4]
  python main.py --mode=predict --workdir=runs/demo --camera=0
  python main.py --mode=export --workdir=runs/demo [--formats=jax,savedmodel,tflite]
  python main.py --mode=serve --workdir=runs/demo [--port=8000]
  python main.py --mode=show_data --workdir=runs/demo

Training again with the same --workdir resumes the run.
"""

import errno
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from simpsons_jax import runtime
from simpsons_jax.modes import evaluate, export, predict, serve, show_data, train

# Each mode: run(workdir, paths after the flags, --config), its flags its own.
MODES = {
  "train": train.run,
  "evaluate": evaluate.run,
  "predict": predict.run,
  "export": export.run,
  "serve": serve.run,
  "show_data": show_data.run,
}
TAKE_PATHS = ("predict",)  # Modes that take files after the flags.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Configuration file, e.g. configs/full.py.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Folder of the run: checkpoints, summaries, map.")
flags.DEFINE_enum(
  "mode",
  "train",
  list(MODES),
  "train (or resume); evaluate a checkpoint; predict the character of images; "
  "export a checkpoint as files that run without this code; serve a web page "
  "and JSON API to try it; show_data draws random training frames with their "
  "labels. Each mode's own flags: --helpfull.",
)
flags.mark_flag_as_required("workdir")

# What a disk or a path refuses: one sentence naming the path and the way out.
DISK_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
DISK_ERRORS |= {errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def main(argv: list[str]) -> None:
  from simpsons_jax import host_memory

  host_memory.keep_freed_memory()  # Before JAX starts its threads: see there.
  from simpsons_jax import errors, files

  paths = argv[1:]
  if paths and FLAGS.mode not in TAKE_PATHS:
    raise app.UsageError(f"Unexpected arguments: {paths}")
  try:
    runtime.start()
    MODES[FLAGS.mode](files.as_path(FLAGS.workdir), paths, FLAGS.config)
  except (errors.UserError, OSError) as error:
    if os.environ.get("SIMPSONS_JAX_TRACEBACK"):
      raise
    if not isinstance(error, errors.UserError):
      if error.errno not in DISK_ERRORS:
        raise
      error = _disk_error(error, FLAGS.mode)
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(1) from None


def _disk_error(error: OSError, mode: str) -> str:
  """A refused write as one sentence: the path, what the disk said, the way out."""
  where = f"{error.filename}: " if error.filename else ""
  if mode == "train":
    fix = "give --workdir a folder on a disk you can write to, with room to spare"
  elif mode == "predict":
    fix = "give --output, --output_dir or --annotate_video a place you can write to"
  else:
    fix = "give --output_dir a folder you can write to"
  return f"{where}{error.strerror or error} ({mode}): {fix}"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with an unknown `--config.KEY` said in one line that
  names the closest keys of the config file (ml_collections raises a chained
  AttributeError for it)."""
  from simpsons_jax import config_keys

  try:
    config_keys.check_config_file(argv)
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, SyntaxError, config_keys.ConfigFileError) as e:
    if os.environ.get("SIMPSONS_JAX_TRACEBACK"):
      raise
    if isinstance(e, SyntaxError):
      said = config_keys.syntax_error(e)
    elif isinstance(e, config_keys.ConfigFileError):
      said = str(e)
    else:
      said = config_keys.unknown_override(argv)
    print(f"error: {said}", file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
