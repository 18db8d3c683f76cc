"""A live camera in a window, the character drawn on each frame (the
notebook's live demo): Tk for the window, PyAV for the camera."""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from simpsons_jax import answers, errors
from simpsons_jax.data import core
from simpsons_jax.video.av_io import annotate, caption_font, require_av


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
      font = font or caption_font(rgb.shape[0])
      probabilities, scores = classify(core.resize(rgb, image_size).numpy()[None])
      recent.append((probabilities[0], scores[0]))
      mean_p = np.mean([p for p, _ in recent], axis=0)
      mean_score = float(np.mean([s for _, s in recent]))
      text = answers.caption(mean_p, names, threshold, mean_score)
      photo = ImageTk.PhotoImage(Image.fromarray(annotate(rgb, text, font)))
      view.configure(image=photo)
      view.image = photo  # Tk keeps no reference of its own.
      window.update()
  except KeyboardInterrupt:
    pass
  finally:
    container.close()
    window.destroy()
