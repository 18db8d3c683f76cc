"""Name the character in image files, folders, videos and a camera with a
trained workdir (`trained.load`)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from simpsons_jax import (
  answers,
  characters,
  errors,
  explain,
  files,
  image_files,
  open_set,
  plots,
  video,
)
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core, folder


def _hidden(name: str) -> bool:
  return name.startswith(".")


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
  """Files as given, and the images inside folders.

  Folders are walked recursively, through symlinked folders (but never back
  up into a folder being walked), leaving out hidden files and folders; their
  images come sorted.
  A path that does not exist is kept, to be reported as such.
  """
  found = []
  for path in map(Path, paths):
    if not path.is_dir():
      found.append(path)
      continue
    images = []
    for here, subfolders, names in os.walk(path, followlinks=True):
      real = os.path.realpath(here)
      subfolders[:] = sorted(
        d
        for d in subfolders
        if not _hidden(d)
        # A link to a folder above would be walked forever.
        and not (real + os.sep).startswith(os.path.realpath(Path(here, d)) + os.sep)
      )
      images += [
        Path(here, name)
        for name in names
        if not _hidden(name)
        and Path(name).suffix.lower() in characters.IMAGE_EXTENSIONS
      ]
    found += sorted(images)
  return found


def _problem_or_image(
  path: Path, image_size: int, max_pixels: int
) -> tuple[str | None, np.ndarray | None]:
  if not path.exists() and not path.is_symlink():
    return f"{printable(path)} does not exist", None
  if path.is_dir():
    return "a folder, not an image", None
  verdict, image = image_files.read_image(path, max_pixels)
  if verdict.reason:
    return verdict.reason, None
  return None, core.resize(image, image_size).numpy()


def printable(path: str | os.PathLike) -> str:
  """A path as text, with bytes that are not UTF-8 written as escapes."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def classify_stream(
  trained: trained_run.TrainedModel,
  paths: Sequence[str | os.PathLike],
  top_k: int = 3,
  threshold: float | answers.UnknownRule = 0.0,
  batch_size: int = 64,
  coverage: float = 0.0,
) -> Iterator[dict[str, Any]]:
  """Yields, per file in order, its top-k characters or its `error`.

  `character` is 'unknown' when the rule `threshold` says (a number: the
  top probability below it). A file that cannot be used
  (missing, unreadable, not a JPEG or PNG, over the pixel limit) gets an
  `error` and the others are classified. With `coverage`, each answer has
  its conformal prediction set (`set`: characters, most probable first).
  """
  image_paths = expand_paths(paths)
  size = trained.config.data.image_size
  max_pixels = folder.max_pixels(trained.config)
  rule = threshold
  if not isinstance(rule, answers.UnknownRule):
    rule = answers.UnknownRule("max_probability", float(threshold))
  classify = trained_run.classifier(trained, batch_size, rule)
  in_set = open_set.coverage_threshold(trained.open_set, coverage) if coverage else None
  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    for start in range(0, len(image_paths), batch_size):
      chunk = image_paths[start : start + batch_size]
      loaded = list(pool.map(lambda p: _problem_or_image(p, size, max_pixels), chunk))
      images = [image for _, image in loaded if image is not None]
      probs, scores = classify(np.stack(images)) if images else ((), ())
      found_rows = iter(zip(probs, scores, strict=True))
      for path, (problem, _) in zip(chunk, loaded, strict=True):
        if problem:
          yield {"path": printable(path), "error": problem}
          continue
        p, score = next(found_rows)
        found = answers.answer(p, trained.cmap.names, top_k, rule.threshold, score)
        if in_set is not None:
          (members,) = open_set.prediction_sets(p[None], in_set)
          found["set"] = [trained.cmap.names[i] for i in members]
        yield {"path": printable(path), **found}


def run(
  workdir: str | os.PathLike,
  paths: Sequence[str],
  top_k: int = 3,
  threshold: str | float = answers.AUTO,
  checkpoint: str = "best",
  output: str = "",
  batch_size: int = 64,
  video_options: video.Options | None = None,
  output_dir: str = "",
  annotate_video: str = "",
  explain_images: bool = False,
  coverage: float = 0.0,
) -> list[dict[str, Any]]:
  """Classifies `paths`, printing one line per image file as it goes; video
  files (by extension) get `video.run` with `video_options`, their tables,
  segments and timelines written to `output_dir` (default: ./predictions).

  With `output`, each image's result is also appended to that file as one line
  of JSON (JSON Lines), flushed as it comes: an interrupted run keeps what it
  did. `threshold` is 'auto' (the run's own unknown score and threshold), a
  probability or 'auto:precision=P'. With
  `explain_images`, each image's Grad-CAM and input-gradient maps for its
  answer go to `<output_dir>/explain/<n>_<name>.png` (`explanation` in its
  result and its JSON line; the drawings of an earlier run there are removed).
  No file written may be one of the inputs (`check_outputs`).
  """
  videos = [p for p in paths if video.is_video(p) and not os.path.isdir(p)]
  images = expand_paths([p for p in paths if p not in videos])
  out_dir = files.as_path(output_dir or "predictions")
  check_outputs(output, annotate_video, videos, images, out_dir, explain_images)
  trained = trained_run.load(workdir, checkpoint)
  rule = trained.rule(threshold)
  if coverage:  # Before any file is read: the run must have prediction sets.
    open_set.coverage_threshold(trained.open_set, coverage)
  results = []
  if videos:
    options = dataclasses.replace(
      video_options or video.Options(), threshold=rule.threshold, top_k=top_k
    )
    results += video.run(
      videos,
      trained_run.classifier(trained, options.batch_size, rule),
      trained.cmap.names,
      trained.config.data.image_size,
      options,
      out_dir,
      annotate_video,
    )
  if not images:
    return results
  drawings = Explanations(trained, out_dir / "explain") if explain_images else None
  with contextlib.ExitStack() as stack:
    sink = stack.enter_context(open(output, "w")) if output else None
    waiting = []

    def done(batch: list[dict[str, Any]]) -> None:
      if drawings is not None:
        drawings.draw(batch)
      for result in batch:
        _say(result)
        if sink:
          sink.write(json.dumps(result) + "\n")
          sink.flush()
      results.extend(batch)

    found = classify_stream(trained, images, top_k, rule, batch_size, coverage)
    for result in found:
      waiting.append(result)
      if len(waiting) == batch_size:
        done(waiting)
        waiting = []
    done(waiting)
  if drawings is not None:
    print(f"Where the model looked: {drawings.count} drawings in {drawings.folder}")
  skipped = sum("error" in r for r in results)
  if skipped:
    logging.warning("%d of %d files could not be classified.", skipped, len(results))
  return results


def check_outputs(
  output: str,
  annotate_video: str,
  videos: Sequence[str],
  images: Sequence[Path],
  out_dir: epath.Path,
  explain_images: bool,
) -> None:
  """Before the model loads or anything is written: UserError when a file
  predict would write is one of its inputs (any spelling or link), two
  outputs are one file, two videos would write the same tables, or the
  drawings' folder holds an input (its earlier drawings are removed)."""
  if annotate_video and not video.is_video(annotate_video):
    raise errors.UserError(
      f"--annotate_video={annotate_video}: name a video file "
      f"({', '.join(video.VIDEO_EXTENSIONS)}), e.g. annotated.mp4"
    )
  if annotate_video and not videos:
    raise errors.UserError("--annotate_video needs a video file among the paths")
  if output and os.path.isdir(output):
    raise errors.UserError(
      f"--output={output} is a folder: name a file, e.g. out.jsonl"
    )
  written = {"--output": output, "--annotate_video": annotate_video}
  stems: dict[str, str] = {}
  for path in videos:
    if (stem := Path(path).stem) in stems:
      raise errors.UserError(
        f"{stems[stem]} and {path} would write the same files in {out_dir} "
        f"({stem}.frames.csv, ...): classify them in two runs with different "
        "--output_dir, or rename one"
      )
    stems[stem] = path
    for table in video.output_files(path, out_dir):
      written[f"the table {table.name} of {path} (--output_dir)"] = table
  files.refuse_writing_inputs(written, [*videos, *images])
  drawn = out_dir / "explain"
  if explain_images:
    inside = [p for p in [*videos, *images] if files.inside(p, drawn)]
    if inside:
      raise errors.UserError(
        f"{printable(inside[0])} lies in {drawn}, where --explain replaces the "
        "drawings of earlier runs: move it, or choose another --output_dir"
      )
  if output:
    files.check_writable(Path(output).parent, "give --output a file you can write")


def _say(result: dict[str, Any]) -> None:
  """One image's answer (or why it was skipped) on the console."""
  if "error" in result:
    print(f"{result['path']}: skipped: {result['error']}")
    return
  guesses = ", ".join(f"{t['character']} {t['probability']:.3f}" for t in result["top"])
  members = f"  set: {', '.join(result['set'])}" if "set" in result else ""
  print(f"{result['path']}: {result['character']}  ({guesses}){members}")


class Explanations:
  """Draws where the model looked for classified images into `folder`: the
  Grad-CAM map of its most probable character and the input gradient, one
  PNG per image (`<n>_<name>.png`, numbered in order), its path added to the
  result as `explanation`. The drawings of an earlier run are removed first,
  so that the folder holds this run's only."""

  PATTERN = re.compile(r"\d{4,}_.*\.png")

  def __init__(self, trained: trained_run.TrainedModel, folder: epath.Path):
    self.trained, self.folder, self.count = trained, folder, 0
    files.check_writable(folder, "give --output_dir a folder you can write to")
    for stale in folder.iterdir():
      if self.PATTERN.fullmatch(stale.name) and stale.is_file():
        stale.unlink()
    self._maps = explain.explainer(
      trained.config, trained.cmap.num_classes, trained.variables
    )

  def draw(self, results: list[dict[str, Any]]) -> None:
    """Adds `explanation` to each classified image of `results`."""
    size = self.trained.config.data.image_size
    max_pixels = folder.max_pixels(self.trained.config)
    names = self.trained.cmap.names
    done = [r for r in results if "error" not in r]
    if not done:
      return
    images = np.stack(
      [_problem_or_image(Path(r["path"]), size, max_pixels)[1] for r in done]
    )
    targets = np.asarray([names.index(r["top"][0]["character"]) for r in done])
    found = self._maps(images, targets)
    for i, result in enumerate(done):
      path = self.folder / f"{self.count:04d}_{Path(result['path']).stem}.png"
      self.count += 1
      top = result["top"][0]
      plots.explanation(
        images[i],
        found["grad_cam"][i],
        found["input_gradient"][i],
        path,
        f"{top['character']} {top['probability']:.2f}: {Path(result['path']).name}",
      )
      result["explanation"] = str(path)


def incomplete(results: Sequence[dict[str, Any]], paths: Sequence[str]) -> str:
  """'' when `run` classified something for every path and skipped nothing,
  else one line saying what was skipped or that nothing was found."""
  if not results:
    return f"Nothing to classify: no image or video found in {', '.join(paths)}."
  skipped = [r["path"] for r in results if "error" in r]
  if skipped:
    return (
      f"{len(skipped)} of {len(results)} files skipped (see above): "
      f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
    )
  return ""


def live(
  workdir: str | os.PathLike,
  camera: int,
  threshold: str | float = answers.AUTO,
  checkpoint: str = "best",
  smooth_window: int = 3,
) -> None:
  """The camera `camera` in a window, the character drawn on each frame."""
  trained = trained_run.load(workdir, checkpoint)
  rule = trained.rule(threshold)
  video.live(
    camera,
    trained_run.classifier(trained, 1, rule),
    trained.cmap.names,
    trained.config.data.image_size,
    rule.threshold,
    smooth_window,
  )
