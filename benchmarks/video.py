"""A clip of known characters from a run's own validation frames, and predict on it.

  pip install -e ".[video]"
  python benchmarks/video.py --workdir=runs/strong_frames --out=clip_demo

Builds `<out>/clip.mp4` (640x360, 25 frames/s): for each of up to
`--characters` characters, `--seconds` of its validation frames (frames the
run never trained on, two seconds each), with half a second of noise between
characters; then runs `--mode=predict`'s video path on it, writing the table,
segments, timeline and annotated video into `<out>`, and prints the
segments found beside the true ones and the frames/s of each pass (decode +
classify; decode + draw + encode), on this machine's CPU or accelerator.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simpsons_jax import cpu_conv, splits, video  # noqa: E402
from simpsons_jax import trained as trained_run  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained run on a folder of frames.")
flags.DEFINE_string("out", "clip_demo", "Where the clip and the results go.")
flags.DEFINE_integer("characters", 4, "How many characters the clip shows.")
flags.DEFINE_float("seconds", 6.0, "Seconds per character.")
flags.DEFINE_float("threshold", 0.5, "predict's --threshold.")
flags.mark_flag_as_required("workdir")

SIZE, FPS = (640, 360), 25


def main(argv: list[str]) -> None:
  del argv
  av = video.require_av()
  trained = trained_run.load(FLAGS.workdir)
  root = Path(trained.config.data.dir).expanduser()
  by_character: dict[str, list[Path]] = {}
  for key in sorted(splits.saved_validation(FLAGS.workdir)):
    character, name = key.split("/", 1)
    by_character.setdefault(character, []).append(root / character / name)
  chosen = sorted(by_character, key=lambda c: -len(by_character[c]))
  chosen = sorted(chosen[: FLAGS.characters])
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  clip, truth, t = out / "clip.mp4", [], 0.0
  rng = np.random.default_rng(0)
  with av.open(str(clip), "w") as sink:
    stream = sink.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = *SIZE, "yuv420p"

    def put(frame: np.ndarray, count: int) -> None:
      for _ in range(count):
        packet = stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
        sink.mux(packet)

    for i, character in enumerate(chosen):
      if i:
        put(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), np.uint8), FPS // 2)
        t += 0.5
      for j in range(int(FLAGS.seconds / 2)):
        path = by_character[character][j % len(by_character[character])]
        put(np.asarray(Image.open(path).convert("RGB").resize(SIZE)), 2 * FPS)
      truth.append((character, t, t + FLAGS.seconds))
      t += FLAGS.seconds
    sink.mux(stream.encode())
  options = video.Options(threshold=FLAGS.threshold)
  classify = trained_run.classifier(trained, options.batch_size)
  start = time.perf_counter()
  analysis = video.analyse(clip, classify, trained.config.data.image_size, options)
  analysed = time.perf_counter() - start
  summary = video.summarise(clip, analysis, trained.cmap.names, options, out)
  start = time.perf_counter()
  frames = video.write_annotated(
    clip,
    analysis.times,
    analysis.probabilities,
    trained.cmap.names,
    options.threshold,
    out / "annotated.mp4",
    analysis.scores,
  )
  annotated = time.perf_counter() - start
  print(video.describe(clip, analysis, summary))
  print("\ntrue segments:")
  for character, begin, end in truth:
    print(f"  {character:28} {begin:5.1f}-{end:5.1f}")
  print(
    f"\n{cpu_conv.cpu_description()}: decode + classify (every "
    f"{analysis.interval:.2f} s): {analysis.frames_decoded / analysed:.0f} frames/s "
    f"of video ({len(analysis.times) / analysed:.1f} classified/s); "
    f"decode + draw + encode: {frames / annotated:.0f} frames/s"
  )


if __name__ == "__main__":
  app.run(main)
