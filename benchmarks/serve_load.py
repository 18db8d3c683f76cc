"""Load on `--mode=serve`: N concurrent clients on localhost, one at a time vs batched.

  pip install -e ".[serve]"
  python benchmarks/serve_load.py --workdir=runs/demo [--clients=50] [--seconds=10]

For each setting of `--max_batches` (default 1, i.e. predictions one at a time,
and 32, requests that wait together run as one batch) it starts the server as
`python main.py --mode=serve` in a process of its own, warms it up, then keeps
`--clients` keep-alive connections busy for `--seconds` (each posts the same
JPEG, `--image` or a synthetic 480x352 cartoon frame, and sends the next request
when the answer is in), and prints requests/s, the latency's median and 99th
percentile, the errors, and the server's resident memory at the start, its peak
and at the end of the window. `--json` also writes the figures with the machine,
the versions and the command.

The clients are one asyncio loop in this process (raw HTTP/1.1 over
sockets): they share the machine's cores with the server, as a user's
browser would not.
"""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import results  # noqa: E402
from simpsons_jax import synthetic  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained run, or a folder of --mode=export.")
flags.DEFINE_integer("clients", 50, "Concurrent clients.")
flags.DEFINE_float("seconds", 10.0, "Seconds of measured load per setting.")
flags.DEFINE_float("warmup", 3.0, "Seconds of load before measuring (compilations).")
flags.DEFINE_list("max_batches", ["1", "32"], "The servers' --max_batch settings.")
flags.DEFINE_string("image", "", "The JPEG to send (default: a 256x256 one).")
flags.DEFINE_string("json", "", "Also write the results to this file.")
flags.mark_flag_as_required("workdir")


def _image() -> bytes:
  """--image, or a cartoon frame (synthetic.render) at a Kaggle frame's usual
  size, 480x352, as a JPEG."""
  if FLAGS.image:
    return Path(FLAGS.image).read_bytes()
  frame = synthetic.render(synthetic.CHARACTERS[0], np.random.default_rng(0))
  out = io.BytesIO()
  frame.resize((480, 352), Image.BILINEAR).save(out, "JPEG", quality=90)
  return out.getvalue()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
  for line in Path(f"/proc/{pid}/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  return float("nan")


async def _client(port: int, request: bytes, until: float, record: list, errors: list):
  reader, writer = await asyncio.open_connection("127.0.0.1", port)
  try:
    while time.monotonic() < until:
      start = time.perf_counter()
      writer.write(request)
      await writer.drain()
      status = int((await reader.readline()).split()[1])
      length = 0
      while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
          length = int(value)
      await reader.readexactly(length)
      (record if status == 200 else errors).append(time.perf_counter() - start)
  finally:
    writer.close()


async def _load(port: int, image: bytes, seconds: float) -> tuple[list, list]:
  request = (
    b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
    + f"Content-Length: {len(image)}\r\n\r\n".encode()
    + image
  )
  record, errors = [], []
  until = time.monotonic() + seconds
  await asyncio.gather(
    *(_client(port, request, until, record, errors) for _ in range(FLAGS.clients))
  )
  return record, errors


def _measure(max_batch: int, image: bytes) -> dict:
  port = _free_port()
  server = subprocess.Popen(
    [sys.executable, "main.py", "--mode=serve", f"--workdir={FLAGS.workdir}"]
    + [f"--port={port}", f"--max_batch={max_batch}"],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    for _ in range(600):
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        time.sleep(0.1)
    asyncio.run(_load(port, image, FLAGS.warmup))
    rss = [_rss_mb(server.pid)]
    start = time.perf_counter()

    async def sampled() -> tuple[list, list]:
      task = asyncio.ensure_future(_load(port, image, FLAGS.seconds))
      while not task.done():
        await asyncio.sleep(0.25)
        rss.append(_rss_mb(server.pid))
      return await task

    latencies, errors = asyncio.run(sampled())
    elapsed = time.perf_counter() - start
  finally:
    server.terminate()
    server.wait(timeout=30)
  ms = np.asarray(latencies) * 1000
  return {
    "max_batch": max_batch,
    "requests_per_second": len(latencies) / elapsed,
    "p50_ms": float(np.percentile(ms, 50)),
    "p99_ms": float(np.percentile(ms, 99)),
    "requests": len(latencies),
    "errors": len(errors),
    "rss_mb": {"start": rss[0], "peak": max(rss), "end": rss[-1]},
  }


def main(argv: list[str]) -> None:
  del argv
  image = _image()
  measured = []
  for max_batch in map(int, FLAGS.max_batches):
    result = _measure(max_batch, image)
    measured.append(result)
    print(
      f"max_batch {max_batch:3d}: {result['requests_per_second']:7.1f} requests/s, "
      f"p50 {result['p50_ms']:6.1f} ms, p99 {result['p99_ms']:6.1f} ms, "
      f"{result['errors']} errors; memory {result['rss_mb']['start']:.0f} MB, "
      f"peak {result['rss_mb']['peak']:.0f} MB, end {result['rss_mb']['end']:.0f} MB"
    )
  if FLAGS.json:
    results.write(
      FLAGS.json,
      "serve_load",
      {
        "clients": FLAGS.clients,
        "seconds": FLAGS.seconds,
        "image_bytes": len(image),
        "results": measured,
      },
      packages=(*results.PACKAGES, "fastapi", "uvicorn"),
    )


if __name__ == "__main__":
  app.run(main)
