"""Every figure: frame grids titled with characters, and the confusion matrix.

Figures are drawn on matplotlib's Agg canvas, object by object (no pyplot,
so the process's backend stays what the caller chose), saved as PNG and
returned as RGB arrays for TensorBoard.
"""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from simpsons_jax import files

RIGHT, WRONG = "#1a7f37", "#cf222e"


def title(name: str) -> str:
  """A character name as a short title: 'homer_simpson' -> 'Homer Simpson'."""
  return textwrap.fill(name.replace("_", " ").title(), 22)


def _subplots(*grid: int, figsize: tuple[float, float], **options) -> tuple:
  """A figure on an Agg canvas of its own and its axes, as `plt.subplots`."""
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig, fig.subplots(*grid, **options)


def _save(fig: Figure, path: str | os.PathLike) -> np.ndarray:
  """Writes `fig` to `path` whole (a temporary file and a rename; also on
  gs://) and returns it as RGB."""
  path = files.as_path(path)
  encoded = io.BytesIO()
  fig.savefig(encoded, format=path.suffix[1:], dpi=100, bbox_inches="tight")
  files.write_bytes_atomic(path, encoded.getvalue())
  fig.canvas.draw()
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  return rgb


def frame_grid(
  frames: Sequence[str | np.ndarray],
  titles: Sequence[str],
  path: str | os.PathLike,
  colours: Sequence[str] | None = None,
  suptitle: str = "",
  columns: int = 3,
  heat_maps: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
  """Frames (files or uint8 RGB pixels) in a grid, each titled (and coloured)
  as given; with `heat_maps` (values in [0, 1], any size), each stretched over
  its frame as the model's resize squeezed the frame."""
  rows = max(1, -(-len(frames) // columns))
  fig, axes = _subplots(
    rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False
  )
  for ax in axes.flat:
    ax.axis("off")
  for i, (frame, title) in enumerate(zip(frames, titles, strict=True)):
    ax = axes.flat[i]
    if isinstance(frame, np.ndarray):
      ax.imshow(frame)
    else:
      with Image.open(frame) as image:
        frame = np.asarray(image.convert("RGB"))
      ax.imshow(frame)
    if heat_maps is not None:
      height, width = frame.shape[:2]
      ax.imshow(
        heat_maps[i],
        cmap="jet",
        alpha=0.45,
        vmin=0,
        vmax=1,
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        interpolation="bilinear",
      )
    ax.set_title(title, fontsize=10, color=colours[i] if colours else "black")
  if suptitle:
    fig.suptitle(suptitle, fontsize=13)
  fig.tight_layout()
  return _save(fig, path)


def prediction_grid(
  frames: Sequence[str | np.ndarray],
  true_names: Sequence[str],
  predicted_names: Sequence[str],
  probabilities: Sequence[float],
  path: str | os.PathLike,
  suptitle: str = "",
  heat_maps: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
  """Frames titled with the prediction: green when right, red with the truth;
  each with where the model looked (`heat_maps`) when given."""
  titles, colours = [], []
  for truth, guess, p in zip(true_names, predicted_names, probabilities, strict=True):
    text = f"{title(guess)} ({p:.0%})"
    if guess != truth:
      text += f"\ntrue: {title(truth)}"
    titles.append(text)
    colours.append(RIGHT if guess == truth else WRONG)
  return frame_grid(
    frames,
    titles,
    path,
    colours,
    suptitle,
    columns=3 if len(frames) <= 9 else 4,
    heat_maps=heat_maps,
  )


def confusion_matrix(
  confusion: np.ndarray, names: Sequence[str], path: str | os.PathLike, title: str = ""
) -> np.ndarray:
  """The confusion matrix normalised per true class (rows), names on both axes."""
  confusion = np.asarray(confusion, np.float64)
  support = confusion.sum(axis=1, keepdims=True)
  normalised = np.divide(
    confusion, support, out=np.zeros_like(confusion), where=support > 0
  )
  size = max(5.0, 0.55 * len(names) + 3)
  fig, ax = _subplots(figsize=(size, size))
  image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
  labels = [name.replace("_", " ") for name in names]
  ax.set_xticks(range(len(names)), labels, rotation=60, ha="right", fontsize=9)
  ax.set_yticks(range(len(names)), labels, fontsize=9)
  ax.set_xlabel("predicted character")
  ax.set_ylabel("true character")
  if len(names) <= 20:
    for i in range(len(names)):
      for j in range(len(names)):
        if confusion[i, j]:
          colour = "white" if normalised[i, j] > 0.5 else "black"
          ax.text(
            j,
            i,
            f"{normalised[i, j]:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color=colour,
          )
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
  ax.set_title(title or "Confusion matrix (rows sum to 1)")
  fig.tight_layout()
  return _save(fig, path)


def explanation(
  image: np.ndarray,
  grad_cam: np.ndarray,
  input_gradient: np.ndarray,
  path: str | os.PathLike,
  title: str,
) -> np.ndarray:
  """The frame as the model saw it, its Grad-CAM map over it, and the input
  gradient's size per pixel (`explain.maps`)."""
  fig, axes = _subplots(1, 3, figsize=(9, 3.4))
  axes[0].imshow(image)
  axes[0].set_title("the frame")
  axes[1].imshow(image)
  axes[1].imshow(grad_cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
  axes[1].set_title("Grad-CAM")
  axes[2].imshow(input_gradient, cmap="gray", vmin=0, vmax=1)
  axes[2].set_title("input gradient")
  for ax in axes:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def reliability_diagram(
  before: Mapping[str, np.ndarray],
  after: Mapping[str, np.ndarray],
  path: str | os.PathLike,
  title: str = "",
) -> np.ndarray:
  """Accuracy against confidence per bin (`calibration.reliability`),
  without and with the temperature, beside the diagonal of perfect
  calibration; each bar's width is its bin, empty bins are left out."""
  bins = len(before["count"])
  edges = np.arange(bins) / bins
  fig, axes = _subplots(1, 2, figsize=(9, 4.4), sharey=True)
  for ax, r, label in (
    (axes[0], before, "uncalibrated"),
    (axes[1], after, "calibrated"),
  ):
    shown = r["count"] > 0
    ax.bar(
      edges[shown],
      r["accuracy"][shown],
      width=1 / bins,
      align="edge",
      edgecolor="black",
      color="tab:blue",
      label="accuracy",
    )
    # Where each bar would end were the model calibrated: its mean confidence.
    ax.plot(
      edges[shown] + 0.5 / bins,
      r["confidence"][shown],
      "_",
      markersize=14,
      markeredgewidth=3,
      color="tab:red",
      label="mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", title=label)
  axes[0].set_ylabel("accuracy")
  axes[0].legend(loc="upper left", fontsize=8)
  fig.suptitle(title or "Reliability")
  fig.tight_layout()
  return _save(fig, path)


def timeline(
  times: np.ndarray,
  probabilities: np.ndarray,
  names: Sequence[str],
  segments: Sequence[dict],
  duration: float,
  path: str | os.PathLike,
  rows: int = 12,
) -> np.ndarray:
  """Who is on screen when: a row per character (those of the segments first,
  then the likeliest others, at most `rows`), time along x, each sample's
  probability as colour, and each segment outlined on its row."""
  shown = [n for n in dict.fromkeys(s["character"] for s in segments) if n in names]
  by_peak = np.argsort(-probabilities.max(axis=0))
  shown += [names[i] for i in by_peak if names[i] not in shown]
  shown = shown[: max(rows, 1)]
  index = [list(names).index(n) for n in shown]
  edges = np.append(times, max(duration, times[-1]) if len(times) else duration)
  fig, ax = _subplots(figsize=(10, 0.45 * len(shown) + 1.4))
  mesh = ax.pcolormesh(
    edges,
    np.arange(len(shown) + 1),
    probabilities[:, index].T,
    cmap="viridis",
    vmin=0.0,
    vmax=1.0,
    shading="flat",
  )
  for s in segments:
    if s["character"] in shown:
      row = shown.index(s["character"])
      ax.add_patch(
        Rectangle(
          (s["start"], row + 0.05),
          s["end"] - s["start"],
          0.9,
          fill=False,
          edgecolor="white",
          linewidth=1.5,
        )
      )
  ax.set_yticks(np.arange(len(shown)) + 0.5, [title(n) for n in shown])
  ax.invert_yaxis()
  ax.set_xlabel("seconds")
  ax.set_xlim(0, edges[-1])
  fig.colorbar(mesh, ax=ax, label="probability (smoothed)", pad=0.01)
  return _save(fig, path)
