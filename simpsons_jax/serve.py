"""A web page and a JSON API to try a trained model: `--mode=serve`.

  pip install -e ".[serve]"
  python main.py --mode=serve --workdir=runs/full [--port=8000] [--threshold=0.5]

`--workdir` is a training run, or a folder written by `--mode=export` (its
`model.jax`, run with jax alone). Routes:
- `GET /`: the page (`serve.html`): drop, pick or paste an image; the top-3
  characters with probability bars, and 'unknown' below the threshold;
- `POST /predict`: the image's bytes as the request body (JPEG or PNG, any
  size and colour mode) -> `{"character", "top": [{"character",
  "probability"}], "threshold"}`;
- `GET /health`, `GET /characters`.

Requests are bounded: the body's size (`max_bytes`), the pixel count read from
the image's header before any decoding (`max_image_pixels`), and the time of
one prediction (`timeout`). The model is loaded once; predictions run one at
a time in a worker thread, so the server keeps answering meanwhile. A bad
upload is a 4xx whose JSON `error` says what was wrong.
"""

import asyncio
import dataclasses
import importlib.resources
import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from simpsons_jax import files, image_files, predict, video
from simpsons_jax.data import core, folder

MAX_BYTES = 20 * 2**20


@dataclasses.dataclass(frozen=True)
class Model:
  """What the server needs: a classifier of uint8 images and its characters."""

  classify: video.Classifier
  names: Sequence[str]
  image_size: int
  max_pixels: int
  source: str


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
    )
  trained = predict.load(path, checkpoint)
  return Model(
    predict.classifier(trained, 1),
    trained.cmap.names,
    trained.config.image_size,
    folder.max_pixels(trained.config),
    f"{path} (step {trained.step})",
  )


class BadUpload(ValueError):
  """An upload the server refuses; `status` is the HTTP status."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def predictor(model: Model, threshold: float, top_k: int = 3) -> Callable:
  """bytes -> the JSON answer, one prediction at a time."""
  lock = threading.Lock()
  k = min(top_k, len(model.names))

  def answer(contents: bytes) -> dict[str, Any]:
    if not contents:
      raise BadUpload(400, "the request has no image: send its bytes as the body")
    problem, image = image_files.inspect(contents, model.max_pixels)
    if problem:
      raise BadUpload(415, f"not usable: {problem}")
    images = core.resize(image, model.image_size).numpy()[None]
    with lock:
      p = np.asarray(model.classify(images))[0]
    top = [
      {"character": model.names[i], "probability": float(p[i])}
      for i in np.argsort(-p)[:k]
    ]
    best = top[0]["character"] if top[0]["probability"] >= threshold else "unknown"
    return {"character": best, "top": top, "threshold": threshold}

  return answer


def create_app(
  model: Model,
  threshold: float = 0.0,
  top_k: int = 3,
  max_bytes: int = MAX_BYTES,
  timeout: float = 30.0,
) -> Any:
  """The FastAPI application."""
  from fastapi import FastAPI, Request
  from fastapi.responses import HTMLResponse, JSONResponse

  app = FastAPI(title="simpsons_jax", docs_url=None, redoc_url=None)
  answer = predictor(model, threshold, top_k)
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
    return {"status": "ok", "model": model.source, "characters": len(model.names)}

  @app.get("/characters")
  def characters() -> list[str]:
    return list(model.names)

  @app.post("/predict")
  async def predict_route(request: Request) -> JSONResponse:
    try:
      declared = int(request.headers.get("content-length") or 0)
      if declared > max_bytes:
        raise BadUpload(413, f"the image is over {max_bytes} bytes")
      body = bytearray()
      async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
          raise BadUpload(413, f"the image is over {max_bytes} bytes")
      try:
        result = await asyncio.wait_for(asyncio.to_thread(answer, bytes(body)), timeout)
      except TimeoutError:
        raise BadUpload(503, f"the prediction took over {timeout:g} s") from None
    except BadUpload as e:
      return JSONResponse({"error": str(e)}, status_code=e.status)
    return JSONResponse(result)

  return app


def run(
  path: str | os.PathLike,
  checkpoint: str = "best",
  threshold: float = 0.0,
  top_k: int = 3,
  host: str = "127.0.0.1",
  port: int = 8000,
) -> None:
  """Serves until interrupted."""
  try:
    import uvicorn
  except ImportError:
    raise ValueError(
      'serving needs FastAPI and uvicorn, an optional extra: pip install -e ".[serve]"'
    ) from None
  model = load(path, checkpoint)
  print(f"Serving {model.source} on http://{host}:{port}/")
  uvicorn.run(create_app(model, threshold, top_k), host=host, port=port)
