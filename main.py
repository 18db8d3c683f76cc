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
import logging as logging_lib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Configuration file, e.g. configs/full.py.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Folder of the run: checkpoints, summaries, map.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "evaluate", "predict", "export", "serve", "show_data"],
  "train (or resume); evaluate a checkpoint; predict the character of images; "
  "export a checkpoint as files that run without this code; serve a web page "
  "and JSON API to try it; show_data draws random training frames with their "
  "labels.",
)
flags.DEFINE_integer("port", 8000, "serve: the HTTP port.")
flags.DEFINE_integer(
  "max_batch", 32, "serve: requests waiting together run as one batch of at most this."
)
flags.DEFINE_float(
  "batch_wait_ms",
  2.0,
  "serve: how long a batch waits for more requests after its first.",
)
flags.DEFINE_string(
  "host", "127.0.0.1", "serve: the address to listen on (0.0.0.0: every interface)."
)
flags.DEFINE_string(
  "checkpoint", "best", "evaluate/predict: 'best', 'latest' or a step number."
)
flags.DEFINE_string(
  "eval_dir",
  "",
  "evaluate: a folder in the Kaggle training layout (<character>/*.jpg) or "
  "test-set layout (<character>_<N>.jpg); default: the run's validation split.",
)
flags.DEFINE_list(
  "formats",
  ["jax", "savedmodel", "tflite"],
  "export: jax (model.jax, jax.export), savedmodel (TensorFlow SavedModel), "
  "tflite (model.tflite, converted from the SavedModel).",
)
flags.DEFINE_integer("top_k", 3, "predict: how many characters to list per image.")
flags.DEFINE_float(
  "threshold", 0.0, "predict: below this probability the answer is 'unknown'."
)
flags.DEFINE_string(
  "output",
  "",
  "predict: also write the results to this file, one JSON object per line "
  "(JSON Lines), as they come.",
)
flags.DEFINE_string(
  "output_dir",
  "",
  "evaluate: write the report, figures and summaries here instead of into "
  "the workdir (for a read-only workdir). predict: where a video's frame "
  "table, segments and timeline go (default: ./predictions). export: "
  "instead of <workdir>/export.",
)
flags.DEFINE_float(
  "video_fps", 2.0, "predict: video frames classified per second; 0: every frame."
)
flags.DEFINE_integer(
  "smooth_window",
  3,
  "predict: a video's probabilities are averaged over this many neighbouring "
  "samples before it is cut into segments (the camera's: over the last ones).",
)
flags.DEFINE_string(
  "annotate_video",
  "",
  "predict: also write the (one) video with the character and probability "
  "drawn on every frame, to this .mp4 file.",
)
flags.DEFINE_integer(
  "camera",
  -1,
  "predict: classify live camera N (0: the first) in a window instead of files.",
)
flags.DEFINE_string(
  "coordinator_address",
  os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
  "Multi-process: host:port of process 0 (or $JAX_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer(
  "num_processes",
  int(os.environ.get("JAX_NUM_PROCESSES", "1")),
  "Multi-process: how many processes (or $JAX_NUM_PROCESSES).",
)
flags.DEFINE_integer(
  "process_id",
  int(os.environ.get("JAX_PROCESS_ID", "0")),
  "Multi-process: this process's index (or $JAX_PROCESS_ID).",
)
flags.DEFINE_bool(
  "distributed",
  False,
  "Start JAX's multi-process runtime with the cluster's own settings (Cloud "
  "TPU pods, SLURM); implied by --coordinator_address.",
)
flags.mark_flag_as_required("workdir")


def _quiet_orbax(record: logging_lib.LogRecord) -> bool:
  """Drops Orbax's per-save INFO lines and the tracebacks of its background
  save threads (a failed save stops the run with one sentence naming the
  cause: checkpointing.SaveFailed); its other warnings and errors still show."""
  if "/orbax/" not in record.pathname:
    return True
  return record.levelno >= logging_lib.WARNING and not record.exc_info


# A user's mistakes (a missing folder, an impossible value, a workdir conflict)
# raise these with a message that names the fix: print it alone, no traceback.
# SIMPSONS_JAX_TRACEBACK=1 shows the traceback too.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)
# What a disk or a path refuses: one sentence naming the path and the way out.
DISK_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def main(argv: list[str]) -> None:
  from simpsons_jax import host_memory

  host_memory.keep_freed_memory()  # Before JAX starts its threads: see there.
  from simpsons_jax import checkpointing, run_folder

  said = (*USER_ERRORS, run_folder.WorkdirBusy, checkpointing.SaveFailed)
  try:
    _run(argv)
  except (*said, OSError) as error:
    if os.environ.get("SIMPSONS_JAX_TRACEBACK"):
      raise
    if not isinstance(error, said):
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
  else:
    fix = "give --output_dir a folder you can write to"
  return f"{where}{error.strerror or error} ({mode}): {fix}"


def _run(argv: list[str]) -> None:
  paths = argv[1:]
  if paths and FLAGS.mode != "predict":
    raise app.UsageError(f"Unexpected arguments: {paths}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  import jax
  import tensorflow as tf

  if FLAGS.coordinator_address:
    jax.distributed.initialize(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
  elif FLAGS.distributed:
    jax.distributed.initialize()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # Process 0 reports progress.

  # tf.data only feeds the host; keep TensorFlow off the accelerators.
  tf.config.set_visible_devices([], "GPU")
  from simpsons_jax import evaluate, export, predict, serve, train, video

  if FLAGS.mode == "train":
    if FLAGS.config is None:
      raise app.UsageError("--config is required to train, e.g. configs/demo.py.")
    logging.info("Config:\n%s", FLAGS.config)
    try:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.Interrupted as stop:
      logging.warning("%s", stop)
      raise SystemExit(128 + stop.signum) from None
  elif FLAGS.mode == "evaluate":
    evaluate.run(
      FLAGS.workdir, FLAGS.eval_dir, FLAGS.checkpoint, output_dir=FLAGS.output_dir
    )
  elif FLAGS.mode == "predict" and FLAGS.camera >= 0:
    if paths:
      raise app.UsageError("--camera reads the camera: give no files.")
    predict.live(
      FLAGS.workdir,
      FLAGS.camera,
      FLAGS.threshold,
      FLAGS.checkpoint,
      FLAGS.smooth_window,
    )
  elif FLAGS.mode == "predict":
    if not paths:
      raise app.UsageError(
        "predict needs image or video files or folders after the flags (or --camera)."
      )
    results = predict.run(
      FLAGS.workdir,
      paths,
      FLAGS.top_k,
      FLAGS.threshold,
      FLAGS.checkpoint,
      FLAGS.output,
      video_options=video.Options(
        fps=FLAGS.video_fps, smooth_window=FLAGS.smooth_window
      ),
      output_dir=FLAGS.output_dir,
      annotate_video=FLAGS.annotate_video,
    )
    if incomplete := predict.incomplete(results, paths):
      print(incomplete, file=sys.stderr)
      raise SystemExit(2)
  elif FLAGS.mode == "export":
    written = export.run(
      FLAGS.workdir, FLAGS.checkpoint, FLAGS.formats, FLAGS.top_k, FLAGS.output_dir
    )
    print(f"Exported {', '.join(written.formats)} to {written.folder}")
  elif FLAGS.mode == "serve":
    serve.run(
      FLAGS.workdir,
      FLAGS.checkpoint,
      FLAGS.threshold,
      FLAGS.top_k,
      FLAGS.host,
      FLAGS.port,
      FLAGS.max_batch,
      FLAGS.batch_wait_ms / 1000,
    )
  else:
    print(evaluate.show_data(FLAGS.workdir))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with an unknown `--config.KEY` said in one line that
  names the closest keys of the config file (ml_collections raises a chained
  AttributeError for it)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    if os.environ.get("SIMPSONS_JAX_TRACEBACK"):
      raise
    from simpsons_jax import config_keys

    print(f"error: {config_keys.unknown_override(argv)}", file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
