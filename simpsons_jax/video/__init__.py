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

import csv
import dataclasses
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging

from simpsons_jax import errors, files, plots
from simpsons_jax.data import core
from simpsons_jax.video.av_io import (
  VIDEO_EXTENSIONS,
  Frames,
  NotAVideo,
  is_video,
  require_av,
  write_annotated,
)
from simpsons_jax.video.camera import live
from simpsons_jax.video.segments import labels, screen_time, segments, smooth

# What `summarise` writes per video: <stem> and these.
OUTPUT_SUFFIXES = (".frames.csv", ".segments.json", ".timeline.png")

if TYPE_CHECKING:
  from simpsons_jax import answers


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
  scores: np.ndarray  # (samples,) the unknown score the threshold compares.
  frames_decoded: int
  duration: float  # Seconds, from the stream's header (or the last frame).
  stopped: str  # '' when the whole video decoded, else where and why not.
  seconds_read: float  # What the decoded frames cover: `duration` if whole.
  interval: float  # Seconds between samples.


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
  times, probs, scores, pending = [], [], [], []

  def flush() -> None:
    if pending:
      found, unknown_scores = classify(np.stack(pending))
      probs.append(np.asarray(found))
      scores.append(np.asarray(unknown_scores))
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
    scores=np.concatenate(scores),
    frames_decoded=frames.decoded,
    duration=duration,
    stopped=stopped,
    seconds_read=seconds_read,
    interval=interval,
  )


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
  probs, scores = analysis.probabilities, analysis.scores
  smoothed = smooth(probs, options.smooth_window)
  smoothed_scores = smooth(scores[:, None], options.smooth_window)[:, 0]
  found = segments(
    analysis.times,
    labels(smoothed, names, options.threshold, smoothed_scores),
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
    per_frame = labels(probs, names, options.threshold, scores)
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
      frames = write_annotated(
        path,
        analysis.times,
        analysis.probabilities,
        names,
        options.threshold,
        annotate_video,
        analysis.scores,
      )
      print(f"  annotated video: {annotate_video} ({frames} frames)")
      result["annotated_frames"] = frames
    results.append(result)
  skipped = [r["path"] for r in results if "error" in r]
  if skipped:
    logging.warning("%d of %d videos skipped: %s", len(skipped), len(paths), skipped)
  return results


__all__ = [
  "VIDEO_EXTENSIONS",
  "Analysis",
  "Frames",
  "NotAVideo",
  "Options",
  "Summary",
  "analyse",
  "describe",
  "is_video",
  "labels",
  "live",
  "output_files",
  "require_av",
  "run",
  "screen_time",
  "segments",
  "smooth",
  "summarise",
  "write_annotated",
]
