"""A web page and a JSON API to try a trained model: `--mode=serve`.

  pip install -e ".[serve]"
  python main.py --mode=serve --workdir=runs/full [--port=8000] [--threshold=0.5]

`--workdir` is a training run, or a folder written by `--mode=export` (its
`model.jax`, run with jax alone). Routes:
- `GET /`: the page (`serve.html`): drop, pick or paste an image; the top-3
  characters with probability bars, and 'unknown' below the threshold;
- `POST /predict`: the image as the request body (JPEG or PNG bytes, any size
  and colour mode), or as the first file of a `multipart/form-data` upload
  (`curl -F image=@frame.jpg`, an HTML form) -> `{"character", "top":
  [{"character", "probability"}], "threshold"}`; `POST /predict?explain=1`
  adds `where_it_looked`: the image as the model saw it with the Grad-CAM map
  of its most probable character over it, a PNG as a `data:` URL (base64;
  the first such request compiles the gradients, a few seconds); the page's
  "where it looked" box asks for it;
- `GET /health`, `GET /characters`.

Requests are bounded: the body's size (`max_bytes`) and the time to send it
(`body_timeout`, then 408), the pixel count read from the image's header before
any decoding (`max_image_pixels`), the pixels waiting to be decoded by all
requests together (`decode_pixels`; a request that cannot join within
`queue_timeout` gets 503 with Retry-After), and the time of one prediction
(`timeout`). The model is loaded once, and compiled for each batch size before
the first request. Requests that wait together are decoded and classified as
one batch (`Batcher`, in the manner of TF Serving's batching: at most
`max_batch` images, gathered for at most `batch_wait` seconds after the
first), with the same answers as one at a time; waiting for a batch holds no
thread. A bad upload is a 4xx whose JSON `error` says
in plain words what was wrong; answers name no local path.
"""

import asyncio
import base64
import concurrent.futures
import dataclasses
import errno
import gc
import importlib.resources
import io
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from simpsons_jax import (
  answers,
  batching,
  connections,
  errors,
  explain,
  files,
  image_files,
  open_set,
  padding,
  uploads,
)
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core, folder

MAX_BYTES = 20 * 2**20


@dataclasses.dataclass(frozen=True)
class Model:
  """What the server needs: a classifier of uint8 images and its characters.
  `classify_with(rule)` classifies (uint8 images (N, S, S, 3), any N) with
  `rule`'s unknown score; `rule(--threshold)` is that rule."""

  classify_with: Callable[[answers.UnknownRule], answers.Classifier]
  rule: Callable[[str], answers.UnknownRule]
  # coverage -> the conformal quantile of its prediction sets (UserError for
  # a run without them).
  set_threshold: Callable[[float], float]
  names: Sequence[str]
  image_size: int
  max_pixels: int
  source: str  # Where it was loaded from, for the console.
  description: str  # What it is, for answers: no local path.
  # (uint8 images (N, S, S, 3), characters (N,)) -> Grad-CAM maps (N, S, S)
  # in [0, 1]; None for an export written before explain.jax.
  explain: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


def load(path: str | os.PathLike, checkpoint: str = "best") -> Model:
  """A training run's checkpoint, or an exported folder's model.jax."""
  path = files.as_path(path)
  from simpsons_jax import export

  if export.is_export(path):
    opened = export.open_folder(path)  # Its files, all there and agreeing.
    maps = opened.grad_cam
    card = opened.card
    return Model(
      opened.classify_with,
      opened.rule,
      lambda c: open_set.coverage_threshold(card.get("open_set", {}), c),
      opened.names,
      card["image_size"],
      image_files.DEFAULT_MAX_PIXELS,
      f"{path / 'model.jax'}",
      f"exported {card.get('model')}, step {card.get('checkpoint_step')}",
      None if maps is None else lambda x, y: np.asarray(maps(x, y)),
    )
  trained = trained_run.load(path, checkpoint)
  grad_cam = explain.explainer(
    trained.config, trained.cmap.num_classes, trained.variables
  )

  def classify_with(rule: answers.UnknownRule) -> answers.Classifier:
    return lambda images: trained_run.classifier(trained, len(images), rule)(images)

  return Model(
    classify_with,
    trained.rule,
    lambda coverage: open_set.coverage_threshold(trained.open_set, coverage),
    trained.cmap.names,
    trained.config.data.image_size,
    folder.max_pixels(trained.config),
    f"{path} (step {trained.step})",
    f"{trained.config.model.name}, step {trained.step}",
    lambda images, targets: grad_cam(images, targets)["grad_cam"],
  )


def preparer(image_size: int) -> Callable[[Sequence[bytes]], np.ndarray]:
  """JPEG or PNG bytes, a batch of them -> the uint8 (N, S, S, 3) images the
  model takes, decoded and resized as training does, in one TensorFlow graph
  call (a call costs more than the work on a small image); BadUpload for a
  batch holding damaged data."""
  import tensorflow as tf

  def one(contents: tf.Tensor) -> tf.Tensor:
    return core.resize(image_files.decode(contents), image_size)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
  def graph(batch: tf.Tensor) -> tf.Tensor:
    shape = tf.TensorSpec([image_size, image_size, 3], tf.uint8)
    return tf.map_fn(one, batch, fn_output_signature=shape, parallel_iterations=4)

  def prepare(batch: Sequence[bytes]) -> np.ndarray:
    try:
      return graph(tf.constant(list(batch), tf.string)).numpy()
    except tf.errors.OpError:
      raise uploads.BadUpload(
        415, "not usable: not a readable JPEG or PNG (its data is damaged or cut short)"
      ) from None

  return prepare


class Predictor:
  """bytes -> the JSON answer, in two halves: `check` (the header, and the
  image's share of the pixels decoded at once, `decode_pixels`, default the
  model's pixel limit; blocking, run it in a thread) and `submit` (to a
  `Batcher` that decodes and classifies the images of at most `max_batch`
  requests at once: a future of the answer). Calling it does both and waits."""

  def __init__(
    self,
    model: Model,
    threshold: str | float,
    top_k: int = 3,
    max_batch: int = 1,
    batch_wait: float = 0.002,
    decode_pixels: int = 0,
    queue_timeout: float = 10.0,
  ):
    self._model = model
    self.rule = model.rule(str(threshold))  # The unknown score and threshold.
    self._classify = model.classify_with(self.rule)
    self._k = min(top_k, len(model.names))
    self._batcher = batching.Batcher(self._run, max_batch, batch_wait)
    self._decode = preparer(model.image_size)
    self._budget = batching.PixelBudget(
      decode_pixels or model.max_pixels, queue_timeout
    )
    # Each batch size compiles at its first use, stalling every request
    # waiting then: all of them now, before the first request.
    for size in (1 << n for n in range((max_batch - 1).bit_length() + 1)):
      shape = (size, model.image_size, model.image_size, 3)
      self._classify(np.zeros(shape, np.uint8))

  def check(self, contents: bytes) -> int:
    """The image's pixel count, taken from the decoding budget; BadUpload if
    it is not usable or the budget did not free up in time."""
    if not contents:
      raise uploads.BadUpload(
        400, "the request has no image: send its bytes as the body"
      )
    problem, pixels = image_files.read_header(contents, self._model.max_pixels)
    if problem:
      raise uploads.BadUpload(415, f"not usable: {problem}")
    if not self._budget.take(pixels):
      raise uploads.BadUpload(
        503, "the server is busy decoding other images: retry in a moment"
      )
    return pixels

  def submit(
    self,
    contents: bytes,
    pixels: int,
    explain_answer: bool = False,
    coverage: float = 0.0,
  ) -> concurrent.futures.Future:
    """A future of the answer for a checked image (`pixels`, from `check`,
    go back to the budget once it is decoded); with `explain_answer`, with
    where the model looked (`where_it_looked`)."""
    return self._batcher.submit((contents, pixels, explain_answer, coverage))

  def __call__(
    self, contents: bytes, explain_answer: bool = False, coverage: float = 0.0
  ) -> dict[str, Any]:
    pixels = self.check(contents)
    return self.submit(contents, pixels, explain_answer, coverage).result()

  def _images(self, batch: list[bytes]) -> list[np.ndarray | Exception]:
    """Decoded together; one by one only when the batch holds damaged data."""
    try:
      return list(self._decode(batch))
    except uploads.BadUpload:
      if len(batch) == 1:
        raise
    images: list[np.ndarray | Exception] = []
    for contents in batch:
      try:
        images.append(self._decode([contents])[0])
      except uploads.BadUpload as e:
        images.append(e)
    return images

  def _run(
    self, items: list[tuple[bytes, int, bool]]
  ) -> list[dict[str, Any] | Exception]:
    try:
      images = self._images([item[0] for item in items])
    finally:
      for _, pixels, _, _ in items:
        self._budget.give_back(pixels)
    good = [i for i, image in enumerate(images) if not isinstance(image, Exception)]
    if not good:
      return images
    probabilities, scores = self._classify(
      padding.pad(np.stack([images[i] for i in good]))
    )
    results: list[dict[str, Any] | Exception] = list(images)
    for i, p, score in zip(good, probabilities, scores, strict=False):
      results[i] = self._answer(p, score, items[i][3])
    wanted = [(i, p.argmax()) for i, p in zip(good, probabilities, strict=False)]
    wanted = [(i, answer) for i, answer in wanted if items[i][2]]
    if wanted:
      shown = padding.pad(np.stack([images[i] for i, _ in wanted]))
      targets = padding.pad(np.asarray([a for _, a in wanted], np.int32))
      maps = self._model.explain(shown, targets)
      for (i, _), image, heat in zip(wanted, shown, maps, strict=False):
        results[i]["where_it_looked"] = _png_data_url(explain.overlay(image, heat))
    return results

  def _answer(self, p: np.ndarray, score: float, coverage: float) -> dict[str, Any]:
    threshold = self.rule.threshold
    found = answers.answer(p, self._model.names, self._k, threshold, score)
    if coverage:
      (members,) = open_set.prediction_sets(
        p[None], self._model.set_threshold(coverage)
      )
      found["set"] = [self._model.names[i] for i in members]
    return {**found, "threshold": threshold, "unknown_score": self.rule.score}


def _unknown_rule_in_words(rule: answers.UnknownRule) -> str:
  """When the page's answer is 'unknown', in words."""
  if rule.score == "max_probability":
    if rule.threshold <= 0:
      return "The answer is always one of the characters the model knows."
    return f'Below a probability of {rule.threshold:g} the answer is "unknown".'
  return (
    f"When the image looks too little like the characters the model knows "
    f"({rule.score} below {rule.threshold:.3g}, chosen on its validation "
    'images), the answer is "unknown".'
  )


def _png_data_url(image: np.ndarray) -> str:
  """A uint8 RGB image as a PNG `data:` URL (base64)."""
  encoded = io.BytesIO()
  Image.fromarray(image).save(encoded, format="PNG")
  return "data:image/png;base64," + base64.b64encode(encoded.getvalue()).decode()


def create_app(
  model: Model,
  threshold: str | float = answers.AUTO,
  top_k: int = 3,
  max_bytes: int = MAX_BYTES,
  timeout: float = 30.0,
  body_timeout: float = 30.0,
  max_batch: int = 32,
  batch_wait: float = 0.002,
  decode_pixels: int = 0,
  queue_timeout: float = 10.0,
) -> Any:
  """The FastAPI application; `threshold` is `--threshold` ('auto': the
  run's own unknown score and threshold)."""
  from fastapi import FastAPI, Request
  from fastapi.responses import HTMLResponse, JSONResponse
  from starlette.requests import ClientDisconnect

  app = FastAPI(title="simpsons_jax", docs_url=None, redoc_url=None)
  predictor = Predictor(
    model, threshold, top_k, max_batch, batch_wait, decode_pixels, queue_timeout
  )
  page_html = (
    importlib.resources.files("simpsons_jax").joinpath("serve.html").read_text()
  )

  @app.get("/", response_class=HTMLResponse)
  def page() -> str:
    return page_html.replace("{{LIMIT}}", f"{max_bytes / 2**20:.3g} MB").replace(
      "{{UNKNOWN}}", _unknown_rule_in_words(predictor.rule)
    )

  @app.get("/health")
  def health() -> dict[str, Any]:
    return {"status": "ok", "model": model.description, "characters": len(model.names)}

  @app.get("/characters")
  def characters() -> list[str]:
    return list(model.names)

  @app.post("/predict")
  async def predict_route(request: Request) -> JSONResponse:
    try:
      asked = request.query_params.get("explain", "0")
      explain_answer = uploads.explain_asked(asked, model)
      coverage = uploads.coverage_asked(request.query_params.get("coverage", ""), model)
      body = await uploads.read_body(request, max_bytes, body_timeout)
      try:
        async with asyncio.timeout(timeout):
          pixels = await asyncio.to_thread(predictor.check, body)
          # Waiting for the batch holds no thread: batches grow with the load.
          result = await asyncio.wrap_future(
            predictor.submit(body, pixels, explain_answer, coverage)
          )
      except TimeoutError:
        raise uploads.BadUpload(
          503, f"the prediction took over {timeout:g} s"
        ) from None
    except ClientDisconnect:
      logging.info("A client went away mid-upload (%s).", request.client)
      return JSONResponse({"error": "the client went away"}, status_code=499)
    except uploads.BadUpload as e:
      headers = {"Retry-After": "1"} if e.status == 503 else None
      return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)
    return JSONResponse(result)

  return app


def listening_socket(host: str, port: int) -> socket.socket:
  """A socket listening on `host:port` (port 0: one the system picks; the
  socket's name says which); UserError in one sentence when it cannot."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  listener = socket.socket(family, socket.SOCK_STREAM)
  listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    listener.bind((host, port))
    listener.listen(2048)
  except OSError as e:
    listener.close()
    if e.errno == errno.EADDRINUSE:
      raise errors.UserError(
        f"port {port} on {host} is in use (another server?): stop it, or "
        "choose another with --port"
      ) from None
    raise errors.UserError(
      f"cannot listen on {host}:{port} ({e.strerror}): check --host and --port"
    ) from None
  return listener


def run(
  path: str | os.PathLike,
  checkpoint: str = "best",
  threshold: str | float = answers.AUTO,
  top_k: int = 3,
  host: str = "127.0.0.1",
  port: int = 8000,
  max_batch: int = 32,
  batch_wait: float = 0.002,
) -> None:
  """Serves until interrupted."""
  try:
    import uvicorn
  except ImportError:
    raise errors.UserError(
      'serving needs FastAPI and uvicorn, an optional extra: pip install -e ".[serve]"'
    ) from None
  listener = listening_socket(host, port)
  model = load(path, checkpoint)
  app = create_app(model, threshold, top_k, max_batch=max_batch, batch_wait=batch_wait)
  # The model's and the libraries' objects out of the garbage collector's
  # sight: its full collections would otherwise stall requests.
  gc.freeze()
  bound = listener.getsockname()[1]
  shown = f"[{host}]" if ":" in host else host
  print(f"Serving {model.source} on http://{shown}:{bound}/", flush=True)
  protocol = connections.bounded_protocol(
    connections.HEADER_TIMEOUT, connections.max_connections()
  )
  # A log line per request costs more than parsing it: errors only.
  config = uvicorn.Config(app, http=protocol, access_log=False)
  uvicorn.Server(config).run(sockets=[listener])
