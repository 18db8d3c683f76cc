"""What a request to the server carries: its body, read within its limits,
the image of a browser form, its query parameters (`explain`, `coverage`)
checked, and the 4xx a bad request gets."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
from typing import Any

from simpsons_jax import errors


class BadUpload(ValueError):
  """An upload the server refuses; `status` is the HTTP status."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


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


async def read_body(request: Any, max_bytes: int, timeout: float) -> bytes:
  """The image of a request (its body, or the first file of a form), at most
  `max_bytes` and sent within `timeout` seconds; else BadUpload (413, 408)."""
  declared = int(request.headers.get("content-length") or 0)
  if declared > max_bytes:
    raise BadUpload(413, f"the image is over {max_bytes} bytes")
  body = bytearray()
  try:
    async with asyncio.timeout(timeout):
      async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
          raise BadUpload(413, f"the image is over {max_bytes} bytes")
  except TimeoutError:
    raise BadUpload(408, f"the upload took over {timeout:g} s") from None
  content_type = request.headers.get("content-type", "")
  if content_type.startswith("multipart/form-data"):
    return image_from_form(content_type, bytes(body))
  return bytes(body)


def coverage_asked(value: str, model: Any) -> float:
  """The `coverage` query parameter (0 when absent); BadUpload when it is
  not a probability in (0, 1), or the model has no prediction sets."""
  if not value:
    return 0.0
  try:
    coverage = float(value)
  except ValueError:
    coverage = -1.0
  if not 0 < coverage < 1:
    raise BadUpload(
      400, f"coverage={value} is not a probability in (0, 1): ask with coverage=0.9"
    )
  try:
    model.set_threshold(coverage)
  except errors.UserError as e:
    raise BadUpload(400, str(e).replace("--coverage", "coverage")) from None
  return coverage


def explain_asked(value: str, model: Any) -> bool:
  """The `explain` query parameter as a yes or no; BadUpload when it is
  neither, or yes to a model that cannot draw maps."""
  if value.lower() in ("0", "false", "no", ""):
    return False
  if value.lower() not in ("1", "true", "yes"):
    raise BadUpload(400, f"explain={value} is not a yes or no: ask with explain=1")
  if model.explain is None:
    raise BadUpload(
      400,
      "this export cannot draw where the model looked (it has no explain.jax): "
      "export the run again, or serve the run itself",
    )
  return True
