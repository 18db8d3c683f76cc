"""An export folder read back: its files checked against the list in
model.json (`verify`) and against each other (`open_folder`), so that a
folder mixed by hand, cut short or edited is refused naming the file."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath

from simpsons_jax import answers, calibration, errors, files, open_set
from simpsons_jax import trained as trained_run


def manifest(folder: epath.Path) -> dict[str, dict[str, Any]]:
  """Every file under `folder` (model.json aside): its size and SHA-256."""
  listed = {}
  every = [where / name for where, _, names in folder.walk() for name in names]
  for path in sorted(every):
    name = path.relative_to(folder).as_posix()
    if name != "model.json":
      data = path.read_bytes()
      listed[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  return listed


class ExportMismatch(errors.UserError):
  """An export folder whose files are not the ones its model.json lists."""


def verify(folder: str | os.PathLike) -> dict[str, Any]:
  """model.json of the export `folder`, once every file it lists is there with
  its size and SHA-256 and no other is; else ExportMismatch naming the file."""
  folder = files.as_path(folder)
  card = files.read_json(folder / "model.json", "export the run again")
  listed = card.get("files")
  fix = "export the run again (python main.py --mode=export --workdir=...)"
  if listed is None:
    raise ExportMismatch(f"{folder}/model.json lists no files (an older export): {fix}")
  present = manifest(folder)
  for name in sorted(set(listed) | set(present)):
    if name not in present:
      problem = "is missing"
    elif name not in listed:
      problem = "is not in model.json (left by another export?)"
    elif present[name] != listed[name]:
      problem = "differs from the one model.json lists"
    else:
      continue
    raise ExportMismatch(f"{folder}/{name} {problem}: {fix}")
  return card


@dataclasses.dataclass(frozen=True)
class Opened:
  """An export folder's model, checked: its card (model.json), characters in
  output order, the probability function (uint8 images (B, S, S, 3) of any B
  -> (B, characters)) and the Grad-CAM function (images, characters (B,)
  int32 -> maps (B, S, S)), None for an export older than explain.jax."""

  card: dict[str, Any]
  names: tuple[str, ...]
  probabilities: Callable[[Any], Any]
  grad_cam: Callable[[Any, Any], Any] | None
  # uint8 images -> the run's unknown score (B,); None for an export of a
  # run without one (or older than unknown.jax).
  unknown: Callable[[Any], Any] | None = None

  def rule(self, value: str) -> answers.UnknownRule:
    """`--threshold` as the rule answering 'unknown' (see
    `trained.unknown_rule`): 'auto' is the run's chosen score and threshold
    when the export carries them."""
    chosen = self.card.get("open_set", {}) if self.unknown is not None else {}
    chosen = {k: v for k, v in chosen.items() if k != "bank"}
    return trained_run.unknown_rule(value, self.card.get("calibration", {}), chosen)

  def classify_with(self, rule: answers.UnknownRule) -> answers.Classifier:
    """uint8 images -> (probabilities, `rule`'s unknown score)."""

    def classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      probabilities = np.asarray(self.probabilities(images))
      if rule.score == "max_probability":
        return probabilities, probabilities.max(-1)
      return probabilities, np.asarray(self.unknown(images))

    return classify


def is_export(folder: str | os.PathLike) -> bool:
  """Whether `folder` is an export folder (it has a model.json)."""
  return (files.as_path(folder) / "model.json").is_file()


def open_folder(folder: str | os.PathLike) -> Opened:
  """The model of an export folder, once its files are those model.json lists
  (`verify`) and agree with each other: characters.json is model.json's list
  of characters, model.jax takes the images model.json describes and gives
  one probability per character, explain.jax loads and draws maps of that
  size, the calibration is sound; else ExportMismatch naming the file."""
  folder = files.as_path(folder)
  card = verify(folder)
  fix = "export the run again (python main.py --mode=export --workdir=...)"

  def mismatch(name: str, why: str) -> ExportMismatch:
    return ExportMismatch(f"{folder}/{name} {why}: {fix}")

  names = files.read_json(folder / "characters.json", fix)
  if not (
    isinstance(names, list)
    and names
    and all(isinstance(n, str) for n in names)
    and len(set(names)) == len(names)
  ):
    raise mismatch("characters.json", "is not a list of distinct character names")
  if names != card.get("characters"):
    raise mismatch("characters.json", "lists other characters than model.json")
  size = card.get("image_size")
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise mismatch("model.json", f"gives image_size {size!r}, not a positive integer")
  calibration.checked(card.get("calibration", {}), f"{folder}/model.json", fix)
  if not (folder / "model.jax").is_file():
    formats = ", ".join(card.get("formats", [])) or "none"
    raise ExportMismatch(
      f"{folder} has no model.jax (it was exported with --formats={formats}): "
      "export the run with --formats=jax to serve it"
    )
  model = _deserialized(folder / "model.jax", mismatch)
  image, out = model.in_avals[0], model.out_avals[0]
  if tuple(image.shape[1:]) != (size, size, 3) or len(model.in_avals) != 1:
    raise mismatch(
      "model.jax", f"does not take {size}x{size} images as model.json says"
    )
  if out.shape[-1] != len(names):
    raise mismatch(
      "model.jax", f"gives {out.shape[-1]} probabilities for {len(names)} characters"
    )
  grad_cam = None
  if (folder / "explain.jax").is_file():
    maps = _deserialized(folder / "explain.jax", mismatch)
    if tuple(maps.out_avals[0].shape[1:]) != (size, size):
      raise mismatch("explain.jax", f"does not draw {size}x{size} maps")
    grad_cam = maps.call
  unknown = None
  if (folder / "unknown.jax").is_file():
    if "open_set" not in card:
      raise mismatch("unknown.jax", "has no score and threshold in model.json")
    open_set.checked(card["open_set"], f"{folder}/model.json", fix, with_bank=False)
    scored = _deserialized(folder / "unknown.jax", mismatch)
    if len(scored.out_avals[0].shape) != 1:
      raise mismatch("unknown.jax", "does not give one score per image")
    unknown = scored.call
  return Opened(card, tuple(names), model.call, grad_cam, unknown)


def _deserialized(path: epath.Path, mismatch: Callable[[str, str], Exception]):
  """The `jax.export.Exported` in `path`, or `mismatch` when it is damaged."""
  try:
    return jax.export.deserialize(bytearray(path.read_bytes()))
  except Exception as e:  # noqa: BLE001 - a damaged flatbuffer raises anything.
    raise mismatch(path.name, f"is damaged ({type(e).__name__})") from None
