"""A trained model as files that run without this repository.

`python main.py --mode=export --workdir=W` writes `W/export/<step>/`:
- `model.jax`: the classifier as serialized StableHLO (`jax.export`), uint8
  images (B, S, S, 3) of any batch size B in, softmax probabilities
  (B, characters) out, the parameters inside; `jax.export.deserialize` and
  `.call` run it with jax alone, on CPU, GPU or TPU;
- `explain.jax`, beside it: where the model looked, as `jax.export` too: the
  same images and the characters to explain (B,) int32 in, Grad-CAM maps
  (B, S, S) in [0, 1] out (`explain.maps`; serve's "where it looked");
- `saved_model/`: a TensorFlow SavedModel (the same StableHLO inside, through
  `jax2tf`) for TF Serving and TensorFlow programs. Its `serving_default`
  signature takes encoded images (JPEG or PNG bytes, any size and colour mode),
  decodes and resizes them as training does, and returns the top-k character
  names and probabilities; `probabilities` takes uint8 images as `model.jax`
  does;
- `model.tflite`: that `probabilities` signature converted to TensorFlow Lite
  (uint8 images at the model's size in, probabilities out), for phones and
  small devices;
- `characters.json` and `model.json`: the characters in output order, the image
  size and the input contract, the checkpoint's validation figures and the
  versions that wrote it.

`jax.export` artifacts have a compatibility window: a newer JAX refuses
exports older than about six months. Export again after upgrading JAX
(`model.json` names the version that wrote them). Convolutions are XLA's own
here (the oneDNN CPU kernels are a custom call of this package, which the
artifacts must not need).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import tensorflow as tf
from etils import epath

from simpsons_jax import calibration, errors, explain, files, image_files, models
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core

FORMATS = ("jax", "savedmodel", "tflite")
PLATFORMS = ("cpu", "cuda", "tpu")  # Where model.jax runs.


def probability_fn(trained: trained_run.TrainedModel):
  """uint8 images (B, S, S, 3) -> probabilities, with XLA's convolutions, the
  run's test-time augmentation and calibration temperature, the parameters as
  constants."""
  config = trained.config
  # XLA's convolutions: no custom calls in a portable artifact.
  model = models.create(config, trained.cmap.num_classes, kernels="xla")
  return functools.partial(
    trained_run.softmax_probabilities,
    model.apply,
    trained.variables,
    flip=trained.config.test_time_flip,
    temperature=trained.temperature,
  )


def _image_spec(size: int, batch: str = "b") -> jax.ShapeDtypeStruct:
  (b,) = jax.export.symbolic_shape(batch)
  return jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8)


def grad_cam_fn(trained: trained_run.TrainedModel):
  """(uint8 images (B, S, S, 3), characters (B,)) -> Grad-CAM maps (B, S, S),
  with XLA's convolutions, the parameters as constants."""
  model = models.create(trained.config, trained.cmap.num_classes, kernels="xla")

  def grad_cam(images: jax.Array, targets: jax.Array) -> jax.Array:
    return explain.maps(model.apply, trained.variables, images, targets)["grad_cam"]

  return grad_cam


def export_jax(trained: trained_run.TrainedModel, folder: epath.Path) -> None:
  """Writes model.jax and explain.jax: batch-polymorphic, for every platform
  in PLATFORMS."""
  images = _image_spec(trained.config.data.image_size)
  exported = jax.export.export(jax.jit(probability_fn(trained)), platforms=PLATFORMS)(
    images
  )
  (folder / "model.jax").write_bytes(exported.serialize())
  targets = jax.ShapeDtypeStruct(images.shape[:1], jnp.int32)
  exported = jax.export.export(jax.jit(grad_cam_fn(trained)), platforms=PLATFORMS)(
    images, targets
  )
  (folder / "explain.jax").write_bytes(exported.serialize())


class _Serving(tf.Module):
  """The SavedModel's functions; the JAX function inside through jax2tf."""

  def __init__(self, trained: trained_run.TrainedModel, top_k: int):
    super().__init__()
    from jax.experimental import jax2tf

    size = trained.config.data.image_size
    self._size = size
    self._top_k = min(top_k, trained.cmap.num_classes)
    self._names = tf.constant(list(trained.cmap.names))
    self._probabilities = jax2tf.convert(
      probability_fn(trained),
      polymorphic_shapes=[f"(b, {size}, {size}, 3)"],
      with_gradient=False,
      native_serialization_platforms=PLATFORMS,
    )
    self.probabilities = tf.function(
      self._probabilities,
      input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, "images")],
      autograph=False,
    )
    self.serve = tf.function(
      self._serve,
      input_signature=[tf.TensorSpec([None], tf.string, "image_bytes")],
      autograph=False,
    )

  def _serve(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
    def one(contents: tf.Tensor) -> tf.Tensor:
      image = image_files.decode(contents)
      image.set_shape([None, None, 3])
      return core.resize(image, self._size)

    images = tf.map_fn(
      one,
      image_bytes,
      fn_output_signature=tf.TensorSpec([self._size] * 2 + [3], tf.uint8),
    )
    probabilities = self._probabilities(images)
    top = tf.math.top_k(probabilities, k=self._top_k)
    return {
      "characters": tf.gather(self._names, top.indices),
      "probabilities": top.values,
      "all_probabilities": probabilities,
    }


def export_savedmodel(
  trained: trained_run.TrainedModel, path: epath.Path, top_k: int
) -> None:
  """Writes the SavedModel with its two signatures."""
  module = _Serving(trained, top_k)
  tf.saved_model.save(
    module,
    str(path),
    signatures={"serving_default": module.serve, "probabilities": module.probabilities},
  )


def export_tflite(saved_model: epath.Path, path: epath.Path) -> None:
  """Converts the SavedModel's `probabilities` signature (uint8 images at the
  model's size, any batch) to TensorFlow Lite: TFLite's converter reads the
  StableHLO inside."""
  converter = tf.lite.TFLiteConverter.from_saved_model(
    str(saved_model), signature_keys=["probabilities"]
  )
  path.write_bytes(converter.convert())


@dataclasses.dataclass(frozen=True)
class Written:
  folder: epath.Path
  formats: tuple[str, ...]


def run(
  workdir: str | os.PathLike,
  checkpoint: str = "best",
  formats: Sequence[str] = FORMATS,
  top_k: int = 3,
  output_dir: str = "",
) -> Written:
  """Exports checkpoint `checkpoint` of `workdir` in `formats` into
  `<output_dir or workdir/export>/<step>/`, replacing that folder whole: it
  is written beside it and moved into place when complete, with `model.json`
  listing every file it holds (`verify` checks them)."""
  formats = [f.strip() for f in formats if f.strip()]
  if not formats:
    raise errors.UserError(
      f"--formats is empty: name one or more of {', '.join(FORMATS)} (nothing "
      "was written or removed)"
    )
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise errors.UserError(
      f"--formats: {', '.join(unknown)} unknown; choose from {', '.join(FORMATS)}"
    )
  parent = files.as_path(output_dir or files.as_path(workdir) / "export")
  files.check_writable(parent, "give --output_dir a folder you can write to")
  trained = trained_run.load(workdir, checkpoint)
  written = set(formats) | ({"savedmodel"} if "tflite" in formats else set())
  written = tuple(f for f in FORMATS if f in written)
  target = parent / str(trained.step)
  if target.exists() and not is_export(target):
    raise errors.UserError(
      f"{target} exists and is not an export (it has no model.json), and an "
      "export replaces its folder whole: choose another --output_dir"
    )
  with files.folder_written_whole(target) as folder:
    if "jax" in written:
      export_jax(trained, folder)
    if "savedmodel" in written:  # TFLite converts it.
      export_savedmodel(trained, folder / "saved_model", top_k)
    if "tflite" in written:
      export_tflite(folder / "saved_model", folder / "model.tflite")
    files.write_text_atomic(
      folder / "characters.json", json.dumps(list(trained.cmap.names), indent=2) + "\n"
    )
    card = _card(trained, workdir, written) | {"files": _manifest(folder)}
    files.write_text_atomic(folder / "model.json", json.dumps(card, indent=2) + "\n")
  return Written(target, written)


def _manifest(folder: epath.Path) -> dict[str, dict[str, Any]]:
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
  present = _manifest(folder)
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
  return Opened(card, tuple(names), model.call, grad_cam)


def _deserialized(path: epath.Path, mismatch: Callable[[str, str], Exception]):
  """The `jax.export.Exported` in `path`, or `mismatch` when it is damaged."""
  try:
    return jax.export.deserialize(bytearray(path.read_bytes()))
  except Exception as e:  # noqa: BLE001 - a damaged flatbuffer raises anything.
    raise mismatch(path.name, f"is damaged ({type(e).__name__})") from None


def _card(
  trained: trained_run.TrainedModel, workdir: str | os.PathLike, formats: Sequence[str]
) -> dict[str, Any]:
  """model.json: what a user of the files needs to know."""
  size = trained.config.data.image_size
  return {
    "formats": list(formats),
    "run": os.fspath(workdir),
    "model": trained.config.model.name,
    "image_size": size,
    "input": (
      f"uint8 RGB images (batch, {size}, {size}, 3), pixel values 0-255; "
      "resize each image to it as training did: decode to RGB, then "
      f"tf.image.resize to {size}x{size} (bilinear, antialias=True, aspect "
      "ratio not kept), round and clip to uint8"
    ),
    "output": (
      "calibrated softmax probabilities (batch, characters), in characters.json's order"
    ),
    "characters": list(trained.cmap.names),
    "test_time_flip": bool(trained.config.test_time_flip),
    # The temperature inside the files, and the validation confidences that
    # `--threshold=auto:precision=P` chooses from (serve of this folder).
    "calibration": trained.calibration or {"temperature": 1.0},
    "checkpoint_step": trained.step,
    "validation": trained.meta.get("val", {}),
    "platforms": list(PLATFORMS),
    "versions": {
      name: importlib.metadata.version(name)
      for name in ("jax", "jaxlib", "flax", "tensorflow-cpu")
      if _installed(name)
    },
    "compatibility": (
      "jax.export artifacts load in JAX versions within about six months of "
      "the one that wrote them: export again after upgrading JAX"
    ),
  }


def _installed(name: str) -> bool:
  try:
    importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return False
  return True
