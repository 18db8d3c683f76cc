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
import importlib.metadata
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import tensorflow as tf
from etils import epath

from simpsons_jax import (
  errors,
  explain,
  files,
  image_files,
  models,
  open_set,
)
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core
from simpsons_jax.export.folder import (
  ExportMismatch,
  Opened,
  is_export,
  manifest,
  open_folder,
  verify,
)

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


def unknown_fn(trained: trained_run.TrainedModel):
  """uint8 images (B, S, S, 3) -> the run's unknown score (B,) (`open_set`:
  the one it chose on validation), the parameters and the knn score's
  feature bank as constants."""
  chosen = trained.open_set
  model = models.create(trained.config, trained.cmap.num_classes, kernels="xla")
  bank = open_set.decode_bank(chosen)

  def score(images: jax.Array) -> jax.Array:
    found = trained_run.outputs(
      model.apply,
      trained.variables,
      images,
      trained.config.test_time_flip,
      trained.temperature,
    )
    if chosen["score"] == "max_probability":
      return found["probabilities"].max(-1)
    if chosen["score"] == "max_logit":
      return found["max_logit"]
    if chosen["score"] == "energy":
      return found["logsumexp"]
    cosine = found["features"] @ jnp.asarray(bank.features).T
    k = min(bank.neighbour, len(bank.features))
    kth = jax.lax.top_k(cosine, k)[0][:, k - 1]
    return -jnp.sqrt(jnp.maximum(2.0 - 2.0 * kth, 0.0))

  return score


def export_jax(trained: trained_run.TrainedModel, folder: epath.Path) -> None:
  """Writes model.jax, explain.jax and, for a run with an unknown score,
  unknown.jax: batch-polymorphic, for every platform in PLATFORMS."""
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
  if trained.open_set:
    exported = jax.export.export(jax.jit(unknown_fn(trained)), platforms=PLATFORMS)(
      images
    )
    (folder / "unknown.jax").write_bytes(exported.serialize())


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
    card = _card(trained, workdir, written) | {"files": manifest(folder)}
    files.write_text_atomic(folder / "model.json", json.dumps(card, indent=2) + "\n")
  return Written(target, written)


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
    # The unknown score unknown.jax computes, its threshold, and the
    # conformity scores of prediction sets (the feature bank is inside).
    **(
      {"open_set": {k: v for k, v in trained.open_set.items() if k != "bank"}}
      if trained.open_set
      else {}
    ),
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


__all__ = [
  "FORMATS",
  "ExportMismatch",
  "Opened",
  "Written",
  "export_jax",
  "export_savedmodel",
  "export_tflite",
  "grad_cam_fn",
  "is_export",
  "manifest",
  "open_folder",
  "probability_fn",
  "run",
  "unknown_fn",
  "verify",
]
