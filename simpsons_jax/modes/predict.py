"""--mode=predict: name the character in images, folders, videos or a camera."""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags
from etils import epath

from simpsons_jax.modes import check_flag, finite_at_least

flags.DEFINE_string(
  "output",
  "",
  "predict: also write the results to this file, one JSON object per line "
  "(JSON Lines), as they come.",
)
flags.DEFINE_float(
  "video_fps", 2.0, "predict: video frames classified per second; 0: every frame."
)
check_flag(
  "video_fps", finite_at_least(0), "frames per second, 0 (every frame) or more"
)
flags.DEFINE_integer(
  "smooth_window",
  3,
  "predict: a video's probabilities are averaged over this many neighbouring "
  "samples before it is cut into segments (the camera's: over the last ones).",
)
check_flag("smooth_window", lambda n: n >= 1, "a whole number of samples, at least 1")
flags.DEFINE_string(
  "annotate_video",
  "",
  "predict: also write the (one) video with the character and probability "
  "drawn on every frame, to this .mp4 file.",
)
flags.DEFINE_bool(
  "explain",
  False,
  "predict: also draw where the model looked for each image (Grad-CAM for its "
  "answer and the input gradient) into <output_dir>/explain/.",
)
flags.DEFINE_integer(
  "camera",
  -1,
  "predict: classify live camera N (0: the first) in a window instead of files.",
)
check_flag("camera", lambda n: n >= -1, "a camera number, 0 or more (-1: none)")
FLAGS = flags.FLAGS


def run(
  workdir: epath.Path, paths: list[str], config: ml_collections.ConfigDict | None
) -> None:
  """Classifies `paths` (or the camera); exit code 2 when anything was skipped
  or nothing was found."""
  del config
  from simpsons_jax import predict, video

  if FLAGS.camera >= 0:
    if paths:
      raise app.UsageError("--camera reads the camera: give no files.")
    predict.live(
      workdir, FLAGS.camera, FLAGS.threshold, FLAGS.checkpoint, FLAGS.smooth_window
    )
    return
  if not paths:
    raise app.UsageError(
      "predict needs image or video files or folders after the flags (or --camera)."
    )
  results = predict.run(
    workdir,
    paths,
    FLAGS.top_k,
    FLAGS.threshold,
    FLAGS.checkpoint,
    FLAGS.output,
    video_options=video.Options(fps=FLAGS.video_fps, smooth_window=FLAGS.smooth_window),
    output_dir=FLAGS.output_dir,
    annotate_video=FLAGS.annotate_video,
    explain_images=FLAGS.explain,
    coverage=FLAGS.coverage,
  )
  if incomplete := predict.incomplete(results, paths):
    print(incomplete, file=sys.stderr)
    raise SystemExit(2)
