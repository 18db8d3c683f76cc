"""Reading and writing videos with PyAV (FFmpeg inside its wheels):
frames streamed by their timestamps, and a copy with a caption drawn on
every frame, written whole."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from simpsons_jax import answers, errors, files

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov")


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


def caption_font(height: int) -> ImageFont.ImageFont:
  return ImageFont.load_default(size=max(12, height // 24))


def annotate(frame: np.ndarray, text: str, font: ImageFont.ImageFont) -> np.ndarray:
  """The frame with `text` in white on a dark box in its top-left corner."""
  image = Image.fromarray(frame)
  draw = ImageDraw.Draw(image)
  box = draw.textbbox((8, 8), text, font=font)
  draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
  draw.text((8, 8), text, fill=(255, 255, 255), font=font)
  return np.asarray(image)


def write_annotated(
  path: str | os.PathLike,
  times: np.ndarray,
  probabilities: np.ndarray,
  names: Sequence[str],
  threshold: float,
  output: str | os.PathLike,
  scores: np.ndarray | None = None,
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
          font = caption_font(stream.height)
        i = max(0, int(np.searchsorted(times, seconds + 1e-6)) - 1)
        score = None if scores is None else scores[i]
        text = answers.caption(probabilities[i], names, threshold, score)
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
