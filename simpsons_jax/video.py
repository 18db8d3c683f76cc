"""Who is on screen: the characters of a video file or a live camera, and when.

A video is decoded as a stream (memory does not grow with its length), a frame
is taken every `1 / fps` seconds of its own timestamps (or every frame), each is
resized as training resizes images and classified in batches by the function
given (`predict.py` passes the trained model's), and the results become:
- a table per sampled frame: time, the character (or 'unknown' below the
  threshold) and the top-k probabilities (`<stem>.frames.csv`);
- segments: who is on screen from when to when, after averaging the
  probabilities over a window of neighbouring samples (`<stem>.segments.json`,
  and a printed summary of screen time per character);
- a timeline picture: characters as rows, time along x, probability as colour
  (`<stem>.timeline.png`);
- optionally the video itself with the name and probability drawn on every
  frame, as the notebook's live demo did.
`live` does the same on a camera, in a window.

Decoding and encoding use PyAV, whose wheels carry FFmpeg and its codecs:
`pip install -e ".[video]"`. A file that does not decode as a video is skipped
and listed; a truncated or damaged one gives what decodes, and says where it
stopped.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from simpsons_jax import answers, errors, files, plots
from simpsons_jax.data import core

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov")
# What `summarise` writes per video: <stem> and these.
OUTPUT_SUFFIXES = (".frames.csv", ".segments.json", ".timeline.png")


def is_video(path: str | os.PathLike) -> bool:
  """Whether `path` is named as a video file."""
  return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def require_av() -> Any:
  """PyAV, or one sentence saying how to install it."""
  try:
    import av
  except ImportError:
    raise errors.UserError(
      'videos need PyAV, an optional extra: pip install -e ".[video]"'
    ) from None
  return av


class NotAVideo(errors.UserError):
  """The file does not open as a video; the message says why."""


@dataclasses.dataclass(frozen=True)
class Options:
  """How a video is sampled and summarised."""

  fps: float = 2.0  # Frames classified per second of video; 0: every frame.
  threshold: float = 0.0  # Below it, a frame or a segment is 'unknown'.
  smooth_window: int = 3  # Samples averaged (centred) before segmenting.
  top_k: int = 3
  batch_size: int = 64


@dataclasses.dataclass
class Analysis:
  """The samples of one video and where its decoding ended."""

  times: np.ndarray  # (samples,) seconds from the video's start.
  probabilities: np.ndarray  # (samples, characters).
  frames_decoded: int
  duration: float  # Seconds, from the stream's header (or the last frame).
  stopped: str  # '' when the whole video decoded, else where and why not.
  seconds_read: float  # What the decoded frames cover: `duration` if whole.
  interval: float  # Seconds between samples.


class Frames:
  """The frames of one video, streamed: iterating yields (index, seconds, RGB
  uint8 array) of the frames one `every` seconds apart by their timestamps
  (0: every frame).

  Opening raises NotAVideo for a file that is not a video. A decoding error
  ends the iteration after the frames that decoded; afterwards `decoded` is
  the number of frames decoded and `error` the error, or ''.
  """

  def __init__(self, path: str | os.PathLike, every: float = 0.0):
    self.av = require_av()
    if problem := files.kind_problem(path):
      raise NotAVideo(problem)
    try:
      self._container = self.av.open(str(path))
    except (self.av.error.FFmpegError, UnicodeDecodeError) as e:
      raise NotAVideo(f"not a video FFmpeg can read ({e})") from None
    if not self._container.streams.video:
      self._container.close()
      raise NotAVideo("no video stream in the file")
    self._stream = self._container.streams.video[0]
    self._stream.thread_type = "AUTO"
    self.every = every
    self.frame_rate = self._stream.average_rate or 25  # A Fraction, e.g. 30000/1001.
    self.rate = float(self.frame_rate)
    if self._stream.duration is not None and self._stream.time_base is not None:
      self.duration = float(self._stream.duration * self._stream.time_base)
    else:  # The container's, in microseconds (av.time_base), or unknown.
      self.duration = (self._container.duration or 0) / 1_000_000
    self.total = self._stream.frames or int(self.duration * self.rate)
    self.decoded, self.error = 0, ""

  def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
    next_time = 0.0
    try:
      for frame in self._container.decode(self._stream):
        index = self.decoded
        self.decoded += 1
        seconds = frame.time if frame.time is not None else index / self.rate
        if self.every <= 0 or seconds >= next_time - 1e-6:
          yield index, float(seconds), frame.to_ndarray(format="rgb24")
          while self.every > 0 and next_time <= seconds + 1e-6:
            next_time += self.every
    except self.av.error.FFmpegError as e:
      self.error = str(e)
    finally:
      self._container.close()


def _progress(total: int, label: str) -> Any:
  """A progress bar on stderr (frames done, rate, ETA) where stderr is a terminal."""
  from tqdm import tqdm

  return tqdm(
    total=total or None, unit="frame", desc=label, disable=not sys.stderr.isatty()
  )


def analyse(
  path: str | os.PathLike,
  classify: answers.Classifier,
  image_size: int,
  options: Options,
) -> Analysis:
  """Samples, resizes and classifies the frames of one video, in batches."""
  frames = Frames(path, 1.0 / options.fps if options.fps > 0 else 0.0)
  interval = 1.0 / options.fps if options.fps > 0 else 1.0 / frames.rate
  times, probs, pending = [], [], []

  def flush() -> None:
    if pending:
      probs.append(np.asarray(classify(np.stack(pending))))
      pending.clear()

  with _progress(frames.total, Path(path).name) as bar:
    for _, seconds, rgb in frames:
      bar.update(frames.decoded - bar.n)
      times.append(seconds)
      pending.append(core.resize(rgb, image_size).numpy())
      if len(pending) == options.batch_size:
        flush()
    bar.update(frames.decoded - bar.n)
    flush()
  stopped, rate = frames.error, frames.rate
  if not times:
    raise NotAVideo(f"no frame decoded{f' ({stopped})' if stopped else ''}")
  last = times[-1]
  duration = frames.duration or last + interval
  if stopped:
    stopped = f"decoding stopped at {last:.2f} s of {duration:.2f} s ({stopped})"
  elif last < duration - 2 * max(interval, 1.0 / rate) - 1e-6:
    stopped = f"the frames end at {last:.2f} s of {duration:.2f} s: truncated?"
  # A video cut short counts what was decoded, not what its header declares.
  seconds_read = min(duration, last + interval) if stopped else duration
  return Analysis(
    times=np.asarray(times),
    probabilities=np.concatenate(probs),
    frames_decoded=frames.decoded,
    duration=duration,
    stopped=stopped,
    seconds_read=seconds_read,
    interval=interval,
  )


def smooth(probabilities: np.ndarray, window: int) -> np.ndarray:
  """Each row averaged with its neighbours: a centred window of `window` rows,
  shortened at the ends."""
  if window <= 1:
    return probabilities
  half = window // 2
  padded = np.cumsum(np.pad(probabilities, ((1, 0), (0, 0))), axis=0)
  n = len(probabilities)
  lo = np.clip(np.arange(n) - half, 0, n)
  hi = np.clip(np.arange(n) + window - half, 0, n)
  return (padded[hi] - padded[lo]) / (hi - lo)[:, None]


def labels(probabilities: np.ndarray, names: Sequence[str], threshold: float) -> list:
  """Each row's most probable character, or 'unknown' below `threshold`."""
  best = probabilities.argmax(axis=1)
  return [
    answers.named(p[i], names[i], threshold)
    for i, p in zip(best, probabilities, strict=True)
  ]


def segments(
  times: np.ndarray, sample_labels: Sequence[str], interval: float, end: float
) -> list[dict[str, Any]]:
  """Runs of one label as {character, start, end} seconds: a run ends where the
  next begins; the last ends at `end` (or one interval after its last sample)."""
  found = []
  for i, label in enumerate(sample_labels):
    if found and found[-1]["character"] == label:
      continue
    if found:
      found[-1]["end"] = float(times[i])
    found.append({"character": label, "start": float(times[i]), "end": None})
  if found:
    found[-1]["end"] = float(max(end, times[-1] + interval) if end else times[-1])
  return found


def screen_time(found: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Seconds on screen per character (unknown included), longest first."""
  total: dict[str, float] = {}
  for s in found:
    total[s["character"]] = total.get(s["character"], 0.0) + s["end"] - s["start"]
  return dict(sorted(total.items(), key=lambda kv: -kv[1]))


@dataclasses.dataclass
class Summary:
  """What `summarise` writes, for the caller and the tests."""

  frames_csv: Path
  segments_json: Path
  timeline_png: Path
  segments: list[dict[str, Any]]
  screen_time: dict[str, float]


def output_files(path: str | os.PathLike, output_dir: str | os.PathLike) -> list[Path]:
  """The files `summarise` writes for the video `path`: its frame table,
  segments and timeline."""
  stem = Path(path).stem
  out = Path(output_dir)
  return [out / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES]


def summarise(
  path: str | os.PathLike,
  analysis: Analysis,
  names: Sequence[str],
  options: Options,
  output_dir: str | os.PathLike,
) -> Summary:
  """Writes the frame table, the segments and the timeline of one video
  (`output_files`)."""
  Path(output_dir).mkdir(parents=True, exist_ok=True)
  frames_csv, segments_json, timeline_png = output_files(path, output_dir)
  probs = analysis.probabilities
  smoothed = smooth(probs, options.smooth_window)
  found = segments(
    analysis.times,
    labels(smoothed, names, options.threshold),
    analysis.interval,
    analysis.seconds_read,
  )
  k = min(options.top_k, len(names))
  with io.StringIO(newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      ["time", "character"]
      + [c for i in range(1, k + 1) for c in (f"top{i}", f"probability{i}")]
    )
    per_frame = labels(probs, names, options.threshold)
    for t, label, p in zip(analysis.times, per_frame, probs, strict=True):
      order = np.argsort(-p)[:k]
      writer.writerow(
        [f"{t:.3f}", label] + [v for i in order for v in (names[i], f"{p[i]:.4f}")]
      )
    files.write_text_atomic(frames_csv, f.getvalue())
  totals = screen_time(found)
  files.write_text_atomic(
    segments_json,
    json.dumps(
      {
        "video": str(path),
        "duration": analysis.duration,
        "seconds_read": analysis.seconds_read,
        "frames_decoded": analysis.frames_decoded,
        "samples": len(analysis.times),
        "sample_interval": analysis.interval,
        "threshold": options.threshold,
        "smooth_window": options.smooth_window,
        "stopped": analysis.stopped,
        "segments": found,
        "screen_time": totals,
      },
      indent=2,
    )
    + "\n",
  )
  plots.timeline(
    analysis.times, smoothed, names, found, analysis.duration, timeline_png
  )
  return Summary(frames_csv, segments_json, timeline_png, found, totals)


def _font(height: int) -> ImageFont.ImageFont:
  return ImageFont.load_default(size=max(12, height // 24))


def annotate(frame: np.ndarray, text: str, font: ImageFont.ImageFont) -> np.ndarray:
  """The frame with `text` in white on a dark box in its top-left corner."""
  image = Image.fromarray(frame)
  draw = ImageDraw.Draw(image)
  box = draw.textbbox((8, 8), text, font=font)
  draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
  draw.text((8, 8), text, fill=(255, 255, 255), font=font)
  return np.asarray(image)


def caption(probabilities: np.ndarray, names: Sequence[str], threshold: float) -> str:
  """'homer_simpson 0.93', or 'unknown (homer_simpson 0.41)' below `threshold`."""
  best = int(np.argmax(probabilities))
  text = f"{names[best]} {probabilities[best]:.2f}"
  return text if probabilities[best] >= threshold else f"{answers.UNKNOWN} ({text})"


def write_annotated(
  path: str | os.PathLike,
  analysis: Analysis,
  names: Sequence[str],
  threshold: float,
  output: str | os.PathLike,
) -> int:
  """Re-decodes the video and writes every frame with the caption of the
  latest sample at or before it (H.264, the source's frame rate; no audio).
  Returns the number of frames written."""
  frames = Frames(path)
  av = frames.av
  output = Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  # Written beside it and renamed when complete: an interrupted run leaves
  # the file as it was (PyAV picks the format from the name's extension).
  temporary = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}")
  written = 0
  try:
    with av.open(str(temporary), "w", options={"movflags": "+faststart"}) as sink:
      stream = sink.add_stream("libx264", rate=frames.frame_rate)
      stream.pix_fmt = "yuv420p"
      font = None
      for _, seconds, rgb in frames:
        if font is None:
          # 4:2:0 needs even sides: an odd last row or column is dropped.
          stream.height, stream.width = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
          font = _font(stream.height)
        i = max(0, int(np.searchsorted(analysis.times, seconds + 1e-6)) - 1)
        text = caption(analysis.probabilities[i], names, threshold)
        frame = annotate(rgb[: stream.height, : stream.width], text, font)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
          sink.mux(packet)
        written += 1
      for packet in stream.encode():
        sink.mux(packet)
    os.replace(temporary, output)
  finally:
    temporary.unlink(missing_ok=True)
  return written


def _camera_device(index: int) -> tuple[str, str]:
  """FFmpeg's name and input format of camera `index` on this system."""
  if sys.platform.startswith("linux"):
    device = f"/dev/video{index}"
    if not Path(device).exists():
      raise errors.UserError(f"no camera {index}: {device} does not exist")
    return device, "v4l2"
  if sys.platform == "darwin":
    return str(index), "avfoundation"
  raise errors.UserError(
    f"--camera is supported on Linux and macOS, not {sys.platform}"
  )


def live(
  camera: int,
  classify: answers.Classifier,
  names: Sequence[str],
  image_size: int,
  threshold: float,
  smooth_window: int,
) -> None:
  """Shows camera `camera` in a window with the character drawn on each frame
  (probabilities averaged over the last `smooth_window` frames), until the
  window is closed or Ctrl+C."""
  if sys.platform.startswith("linux") and not (
    os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
  ):
    raise errors.UserError(
      "--camera shows a window and there is no display here (DISPLAY is not "
      "set): run it in a desktop session, or record a clip and predict on the file"
    )
  av = require_av()
  device, input_format = _camera_device(camera)
  try:
    container = av.open(device, format=input_format)
  except av.error.FFmpegError as e:
    raise errors.UserError(
      f"camera {camera} ({device}) cannot be opened: {e}"
    ) from None
  try:
    import tkinter

    from PIL import ImageTk
  except ImportError:
    container.close()
    raise errors.UserError(
      "--camera needs tkinter (Tk), which this Python lacks: install its Tk "
      "package (e.g. python3-tk)"
    ) from None
  window = tkinter.Tk()
  window.title("simpsons_jax: who is on screen (close the window to stop)")
  view = tkinter.Label(window)
  view.pack()
  closed = []
  window.protocol("WM_DELETE_WINDOW", lambda: closed.append(True))
  recent: collections.deque = collections.deque(maxlen=max(smooth_window, 1))
  font = None
  try:
    for frame in container.decode(video=0):
      if closed:
        break
      rgb = frame.to_ndarray(format="rgb24")
      font = font or _font(rgb.shape[0])
      recent.append(classify(core.resize(rgb, image_size).numpy()[None])[0])
      text = caption(np.mean(recent, axis=0), names, threshold)
      photo = ImageTk.PhotoImage(Image.fromarray(annotate(rgb, text, font)))
      view.configure(image=photo)
      view.image = photo  # Tk keeps no reference of its own.
      window.update()
  except KeyboardInterrupt:
    pass
  finally:
    container.close()
    window.destroy()


def describe(path: str | os.PathLike, analysis: Analysis, summary: Summary) -> str:
  """The printed summary of one video: screen time per character."""
  lines = [
    f"{path}: {len(analysis.times)} frames classified of {analysis.frames_decoded}"
    f" decoded, {analysis.duration:.1f} s"
    + (f" declared, {analysis.seconds_read:.1f} s read" if analysis.stopped else "")
  ]
  if analysis.stopped:
    lines.append(f"  warning: {analysis.stopped}")
  for character, seconds in summary.screen_time.items():
    spans = ", ".join(
      f"{s['start']:.1f}-{s['end']:.1f}"
      for s in summary.segments
      if s["character"] == character
    )
    lines.append(f"  {character:28} {seconds:7.1f} s   ({spans})")
  lines.append(
    f"  written: {summary.frames_csv}, {summary.segments_json}, {summary.timeline_png}"
  )
  return "\n".join(lines)


def run(
  paths: Sequence[str | os.PathLike],
  classify: answers.Classifier,
  names: Sequence[str],
  image_size: int,
  options: Options,
  output_dir: str | os.PathLike,
  annotate_video: str = "",
) -> list[dict[str, Any]]:
  """Analyses each video, prints its summary, writes its files; a file that is
  not a video is skipped and listed. Returns one result per path."""
  if annotate_video and len(paths) != 1:
    raise errors.UserError(
      f"--annotate_video writes one video: give one video, not {len(paths)}"
    )
  # Where the results go must take them before hours of decoding.
  files.check_writable(output_dir, "give --output_dir a folder you can write to")
  if annotate_video:
    files.check_writable(
      Path(annotate_video).parent,
      "give --annotate_video a file in a folder you can write to",
    )
  results = []
  for path in paths:
    start = time.perf_counter()
    try:
      analysis = analyse(path, classify, image_size, options)
    except (NotAVideo, FileNotFoundError, IsADirectoryError) as e:
      print(f"{path}: skipped: {e}")
      results.append({"path": str(path), "error": str(e)})
      continue
    seconds = time.perf_counter() - start
    summary = summarise(path, analysis, names, options, output_dir)
    print(describe(path, analysis, summary))
    logging.info(
      "%s: %d frames decoded, %d classified in %.1f s (%.0f frames/s decoded).",
      path,
      analysis.frames_decoded,
      len(analysis.times),
      seconds,
      analysis.frames_decoded / seconds,
    )
    result = {
      "path": str(path),
      "segments": summary.segments,
      "screen_time": summary.screen_time,
      "stopped": analysis.stopped,
    }
    if annotate_video:
      frames = write_annotated(path, analysis, names, options.threshold, annotate_video)
      print(f"  annotated video: {annotate_video} ({frames} frames)")
      result["annotated_frames"] = frames
    results.append(result)
  skipped = [r["path"] for r in results if "error" in r]
  if skipped:
    logging.warning("%d of %d videos skipped: %s", len(skipped), len(paths), skipped)
  return results
