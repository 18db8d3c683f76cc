"""Leave out the images that copy another set's, at any size or encoding.

Data sets of one origin share frames: Simpsons-MNIST's 28 px images are
downscaled Kaggle frames, and most of `../shared/data/frames` are full-size
copies of them. A run that trains on one set and is then judged on the other
must not have seen the other's images, not even shrunk. `config.data.exclude_copies_of`
names a folder (either Kaggle layout); `exclude` drops every training candidate
that is a near-copy of one of its images.

Near-copy, measured on thumbnails (each image shrunk to `THUMBNAIL` pixels
square by area averaging, so that size and JPEG encoding matter little) as the
root-mean-square difference of their 0-255 values: for each reference image,
the candidates within `MARGIN` times the distance of the nearest one and
within `LIMIT` (docs/results.md: how these were chosen on the shared sets).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from simpsons_jax import characters, files, image_files

THUMBNAIL = 16
MARGIN = 1.25
LIMIT = 30.0
REPORT_FILENAME = "excluded_copies.json"


def thumbnails(paths: Sequence[epath.Path]) -> np.ndarray:
  """(len(paths), THUMBNAIL**2 * 3) float32 RGB thumbnails."""
  out = np.empty((len(paths), THUMBNAIL * THUMBNAIL * 3), np.float32)
  for i, path in enumerate(paths):
    with Image.open(io.BytesIO(files.as_path(path).read_bytes())) as image:
      small = image.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.BOX)
    out[i] = np.asarray(small, np.float32).reshape(-1)
  return out


def copies(reference: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """Indices of the candidates that are near-copies of a reference thumbnail."""
  found = np.zeros(len(candidates), bool)
  if not len(candidates):
    return np.flatnonzero(found)
  squared = (candidates**2).sum(1)
  size = candidates.shape[1]
  for start in range(0, len(reference), 256):
    chunk = reference[start : start + 256]
    squares = squared[None] - 2 * chunk @ candidates.T + (chunk**2).sum(1)[:, None]
    distances = np.sqrt(np.maximum(squares, 0) / size)
    nearest = distances.min(1, keepdims=True)
    found |= ((distances <= MARGIN * nearest) & (distances <= LIMIT)).any(0)
  return np.flatnonzero(found)


def exclude(
  images: Mapping[str, list[epath.Path]],
  reference_dir: str | os.PathLike,
  report_dir: epath.Path | None,
  max_pixels: int = image_files.DEFAULT_MAX_PIXELS,
) -> dict[str, list[epath.Path]]:
  """`images` without the near-copies of the images in `reference_dir`.

  What is left out is listed in `<report_dir>/excluded_copies.json`.
  """
  reference = image_files.keep_usable(
    characters.find_labelled_images(reference_dir, "--config.data.exclude_copies_of"),
    None,
    max_pixels,
  ).images
  reference_paths = [p for paths in reference.values() for p in paths]
  candidates = [p for paths in images.values() for p in paths]
  dropped = copies(thumbnails(reference_paths), thumbnails(candidates))
  left_out = {os.fspath(candidates[i]) for i in dropped}
  logging.info(
    "Left out %d of %d images as near-copies of the %d images of %s.",
    len(left_out),
    len(candidates),
    len(reference_paths),
    reference_dir,
  )
  if report_dir is not None:
    report = {
      "exclude_copies_of": os.fspath(reference_dir),
      "left_out": sorted(left_out),
    }
    files.write_text_atomic(
      files.as_path(report_dir) / REPORT_FILENAME,
      json.dumps(report, indent=1) + "\n",
    )
  return {
    name: [p for p in paths if os.fspath(p) not in left_out]
    for name, paths in images.items()
  }
