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
  [{"character", "probability"}], "threshold"}`;
- `GET /health`, `GET /characters`.

Requests are bounded: the body's size (`max_bytes`) and the time to send it
(`body_timeout`, then 408), the pixel count read from the image's header before
any decoding (`max_image_pixels`), the pixels being decoded at once by all
requests together (`decode_pixels`; a request that cannot start within
`queue_timeout` gets 503 with Retry-After), and the time of one prediction
(`timeout`). The model is loaded once. Requests that wait together run as one
batch (`Batcher`, in the manner of TF Serving's batching: at most `max_batch`
images, gathered for at most `batch_wait` seconds after the first), with the
same answers as one at a time. A bad upload is a 4xx whose JSON `error` says
in plain words what was wrong; answers name no local path.
"""

import asyncio
import concurrent.futures
import dataclasses
import email.parser
import email.policy
import errno
import importlib.resources
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from simpsons_jax import files, image_files, predict, video
from simpsons_jax.data import core, folder

MAX_BYTES = 20 * 2**20


@dataclasses.dataclass(frozen=True)
class Model:
  """What the server needs: a classifier of uint8 images and its characters."""

  classify: video.Classifier  # uint8 images (N, S, S, 3), any N.
  names: Sequence[str]
  image_size: int
  max_pixels: int
  source: str  # Where it was loaded from, for the console.
  description: str  # What it is, for answers: no local path.


def load(path: str | os.PathLike, checkpoint: str = "best") -> Model:
  """A training run's checkpoint, or an exported folder's model.jax."""
  path = files.as_path(path)
  if (path / "model.json").is_file():  # An export folder.
    import jax

    from simpsons_jax import export

    card = export.verify(path)  # Files of one export, all there.
    exported = jax.export.deserialize((path / "model.jax").read_bytes())
    return Model(
      lambda images: np.asarray(exported.call(images)),
      tuple(json.loads((path / "characters.json").read_text())),
      card["image_size"],
      image_files.DEFAULT_MAX_PIXELS,
      f"{path / 'model.jax'}",
      f"exported {card['model']}, step {card['checkpoint_step']}",
    )
  trained = predict.load(path, checkpoint)
  return Model(
    lambda images: predict.classifier(trained, len(images))(images),
    trained.cmap.names,
    trained.config.image_size,
    folder.max_pixels(trained.config),
    f"{path} (step {trained.step})",
    f"{trained.config.model}, step {trained.step}",
  )


class BadUpload(ValueError):
  """An upload the server refuses; `status` is the HTTP status."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class Batcher:
  """Runs the images of requests that wait together as one batch.

  `__call__` queues one image and blocks until its probabilities are there.
  One worker thread takes the first image waiting, gathers more for at most
  `wait` seconds (at most `max_batch` in all), and classifies them at once,
  padded to a power of two so that few batch sizes are ever compiled. With
  `max_batch` 1, requests run one at a time.
  """

  def __init__(
    self, classify: video.Classifier, max_batch: int = 32, wait: float = 0.002
  ):
    if max_batch < 1:
      raise ValueError(f"--max_batch must be at least 1, not {max_batch}")
    self._classify, self._max_batch, self._wait = classify, max_batch, wait
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=self._work, name="batcher", daemon=True).start()

  def __call__(self, image: np.ndarray) -> np.ndarray:
    done: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((image, done))
    return done.result()

  def _work(self) -> None:
    while True:
      waiting = [self._queue.get()]
      deadline = time.monotonic() + self._wait
      while len(waiting) < self._max_batch:
        try:
          waiting.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
          break
      images = np.stack([image for image, _ in waiting])
      size = 1 << (len(waiting) - 1).bit_length()  # The next power of two.
      padded = np.concatenate(
        [images, np.zeros((size - len(images), *images.shape[1:]), images.dtype)]
      )
      try:
        probabilities = np.asarray(self._classify(padded))
      except Exception as e:  # noqa: BLE001 - handed to every waiting request.
        for _, done in waiting:
          done.set_exception(e)
        continue
      for (_, done), p in zip(waiting, probabilities, strict=False):
        done.set_result(p)


class PixelBudget:
  """The pixels all requests may be decoding at once: a request waits for its
  image's share (read from the header) for at most `timeout` seconds."""

  def __init__(self, pixels: int, timeout: float):
    self.total, self._free, self._timeout = pixels, pixels, timeout
    self._changed = threading.Condition()

  def take(self, pixels: int) -> bool:
    """Takes `pixels` of the budget (an image larger than all of it takes all
    of it: it decodes alone); False if they did not free up in time."""
    pixels = min(pixels, self.total)
    with self._changed:
      if not self._changed.wait_for(lambda: self._free >= pixels, self._timeout):
        return False
      self._free -= pixels
      return True

  def give_back(self, pixels: int) -> None:
    with self._changed:
      self._free += min(pixels, self.total)
      self._changed.notify_all()


def preparer(image_size: int) -> Callable[[bytes], np.ndarray]:
  """JPEG or PNG bytes -> the uint8 (S, S, 3) image the model takes, decoded
  and resized as training does, in one TensorFlow graph (eager ops cost more
  than their work on small images); BadUpload where the data is damaged."""
  import tensorflow as tf

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
  def graph(contents: tf.Tensor) -> tf.Tensor:
    return core.resize(image_files.decode(contents), image_size)

  def prepare(contents: bytes) -> np.ndarray:
    try:
      return graph(contents).numpy()
    except tf.errors.OpError:
      raise BadUpload(
        415, "not usable: not a readable JPEG or PNG (its data is damaged or cut short)"
      ) from None

  return prepare


def predictor(
  model: Model,
  threshold: float,
  top_k: int = 3,
  max_batch: int = 1,
  batch_wait: float = 0.002,
  decode_pixels: int = 0,
  queue_timeout: float = 10.0,
) -> Callable[[bytes], dict[str, Any]]:
  """bytes -> the JSON answer. Images are decoded within a pixel budget
  (`decode_pixels`, default the model's pixel limit) and classified by a
  `Batcher` of `max_batch` images."""
  run = Batcher(model.classify, max_batch, batch_wait)
  prepare = preparer(model.image_size)
  budget = PixelBudget(decode_pixels or model.max_pixels, queue_timeout)
  k = min(top_k, len(model.names))

  def answer(contents: bytes) -> dict[str, Any]:
    if not contents:
      raise BadUpload(400, "the request has no image: send its bytes as the body")
    problem = image_files.header_problem(contents, model.max_pixels)
    if problem:
      raise BadUpload(415, f"not usable: {problem}")
    pixels = image_files.header_pixels(contents)
    if not budget.take(pixels):
      raise BadUpload(
        503, "the server is busy decoding other images: retry in a moment"
      )
    try:
      resized = prepare(contents)
    finally:
      budget.give_back(pixels)
    p = run(resized)
    top = [
      {"character": model.names[i], "probability": float(p[i])}
      for i in np.argsort(-p)[:k]
    ]
    best = top[0]["character"] if top[0]["probability"] >= threshold else video.UNKNOWN
    return {"character": best, "top": top, "threshold": threshold}

  return answer


def image_from_form(content_type: str, body: bytes) -> bytes:
  """The first file of a multipart/form-data body (what `curl -F`, HTML forms
  and most client libraries send), or BadUpload naming what is missing."""
  header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
  message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
  if not message.is_multipart():
    raise BadUpload(400, "a multipart/form-data body without parts")
  for part in message.iter_parts():
    if part.get_filename() is not None or part.get_content_maintype() == "image":
      return part.get_payload(decode=True) or b""
  raise BadUpload(400, "the form has no file: attach the image as a file field")


def create_app(
  model: Model,
  threshold: float = 0.0,
  top_k: int = 3,
  max_bytes: int = MAX_BYTES,
  timeout: float = 30.0,
  body_timeout: float = 30.0,
  max_batch: int = 32,
  batch_wait: float = 0.002,
  decode_pixels: int = 0,
  queue_timeout: float = 10.0,
) -> Any:
  """The FastAPI application."""
  from fastapi import FastAPI, Request
  from fastapi.responses import HTMLResponse, JSONResponse
  from starlette.requests import ClientDisconnect

  app = FastAPI(title="simpsons_jax", docs_url=None, redoc_url=None)
  answer = predictor(
    model, threshold, top_k, max_batch, batch_wait, decode_pixels, queue_timeout
  )
  page_html = (
    importlib.resources.files("simpsons_jax").joinpath("serve.html").read_text()
  )

  @app.get("/", response_class=HTMLResponse)
  def page() -> str:
    return page_html.replace("{{LIMIT}}", f"{max_bytes / 2**20:.3g} MB").replace(
      "{{THRESHOLD}}", f"{threshold:g}"
    )

  @app.get("/health")
  def health() -> dict[str, Any]:
    return {"status": "ok", "model": model.description, "characters": len(model.names)}

  @app.get("/characters")
  def characters() -> list[str]:
    return list(model.names)

  async def read_body(request: Request) -> bytes:
    declared = int(request.headers.get("content-length") or 0)
    if declared > max_bytes:
      raise BadUpload(413, f"the image is over {max_bytes} bytes")
    body = bytearray()
    try:
      async with asyncio.timeout(body_timeout):
        async for chunk in request.stream():
          body += chunk
          if len(body) > max_bytes:
            raise BadUpload(413, f"the image is over {max_bytes} bytes")
    except TimeoutError:
      raise BadUpload(408, f"the upload took over {body_timeout:g} s") from None
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
      return image_from_form(content_type, bytes(body))
    return bytes(body)

  @app.post("/predict")
  async def predict_route(request: Request) -> JSONResponse:
    try:
      body = await read_body(request)
      try:
        result = await asyncio.wait_for(asyncio.to_thread(answer, body), timeout)
      except TimeoutError:
        raise BadUpload(503, f"the prediction took over {timeout:g} s") from None
    except ClientDisconnect:
      logging.info("A client went away mid-upload (%s).", request.client)
      return JSONResponse({"error": "the client went away"}, status_code=499)
    except BadUpload as e:
      headers = {"Retry-After": "1"} if e.status == 503 else None
      return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)
    return JSONResponse(result)

  return app


def check_port(host: str, port: int) -> None:
  """ValueError in one sentence when `host:port` cannot be listened on."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind((host, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise ValueError(
          f"port {port} on {host} is in use (another server?): stop it, or "
          "choose another with --port"
        ) from None
      raise ValueError(
        f"cannot listen on {host}:{port} ({e.strerror}): check --host"
      ) from None


def run(
  path: str | os.PathLike,
  checkpoint: str = "best",
  threshold: float = 0.0,
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
    raise ValueError(
      'serving needs FastAPI and uvicorn, an optional extra: pip install -e ".[serve]"'
    ) from None
  check_port(host, port)
  model = load(path, checkpoint)
  app = create_app(model, threshold, top_k, max_batch=max_batch, batch_wait=batch_wait)
  print(f"Serving {model.source} on http://{host}:{port}/")
  # A log line per request costs more than parsing it: errors only.
  uvicorn.run(app, host=host, port=port, access_log=False)
