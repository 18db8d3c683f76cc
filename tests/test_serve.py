"""--mode=serve: the JSON API over real HTTP, and the page in a headless browser."""

import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from simpsons_jax import explain, export, image_files, predict, serve, uploads
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core

pytest.importorskip("fastapi", reason='the serve extra: pip install -e ".[serve]"')
uvicorn = pytest.importorskip("uvicorn")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _serving(app) -> Iterator[int]:
  """`app` on a free localhost port in a thread, until the block ends."""
  port = _free_port()
  config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
  running = uvicorn.Server(config)
  thread = threading.Thread(target=running.run, daemon=True)
  thread.start()
  for _ in range(200):
    if running.started:
      break
    time.sleep(0.05)
  yield port
  running.should_exit = True
  thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(trained_workdir):
  """The app on localhost, with a 200 KB body limit."""
  app = serve.create_app(serve.load(trained_workdir), threshold=0.99, max_bytes=200_000)
  with _serving(app) as port:
    yield f"http://127.0.0.1:{port}"


def _request(url: str, data: bytes | None = None) -> tuple[int, dict]:
  request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_the_api_answers_as_predict_does(server, trained_workdir, tiny_data_dir):
  trained = trained_run.load(trained_workdir)
  status, health = _request(f"{server}/health")
  assert status == 200 and health["status"] == "ok"
  assert health["characters"] == trained.cmap.num_classes
  assert _request(f"{server}/characters") == (200, list(trained.cmap.names))
  frames = sorted(tiny_data_dir.glob("*/*.jpg"))[::17][:4]
  expected = list(predict.classify_stream(trained, frames, top_k=3, threshold=0.99))
  for frame, want in zip(frames, expected, strict=True):
    status, answer = _request(f"{server}/predict", frame.read_bytes())
    assert status == 200
    assert answer["character"] == want["character"]  # 'unknown' below 0.99
    assert [t["character"] for t in answer["top"]] == [
      t["character"] for t in want["top"]
    ]
    for got, ref in zip(answer["top"], want["top"], strict=True):
      assert got["probability"] == pytest.approx(ref["probability"], abs=1e-6)
    assert answer["threshold"] == 0.99


@pytest.mark.parametrize(
  "body, status, message",
  [
    (b"", 400, "no image"),
    (b"just some text, not an image", 415, "not usable"),
    (b"\xff\xd8\xff" + b"\0" * 300_000, 413, "over 200000 bytes"),
  ],
)
def test_bad_uploads_get_a_4xx_with_a_message(server, body, status, message):
  request = urllib.request.Request(f"{server}/predict", data=body, method="POST")
  with pytest.raises(urllib.error.HTTPError) as error:
    urllib.request.urlopen(request, timeout=60)
  assert error.value.code == status
  assert message in json.loads(error.value.read())["error"]


def _whole_reply(connection: socket.socket) -> str:
  """A reply read to the end of its body (its head and body may come apart)."""
  reply = b""
  while True:
    head, ended, body = reply.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    if ended and length and len(body) >= int(length[1]):
      return reply.decode(errors="replace")
    chunk = connection.recv(4096)
    if not chunk:  # Closed: the reply is whatever came.
      return reply.decode(errors="replace")
    reply += chunk


def _picture(data_url: str) -> np.ndarray:
  """A `data:image/png;base64,` URL's pixels."""
  prefix = "data:image/png;base64,"
  assert data_url.startswith(prefix)
  with Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))) as image:
    assert image.format == "PNG"
    return np.asarray(image)


def test_where_it_looked_comes_on_request_as_a_small_png(
  server, trained_workdir, tiny_data_dir
):
  frame = sorted(tiny_data_dir.glob("*/*.jpg"))[7]
  status, plain = _request(f"{server}/predict", frame.read_bytes())
  assert status == 200 and "where_it_looked" not in plain
  status, answer = _request(f"{server}/predict?explain=1", frame.read_bytes())
  assert status == 200
  assert answer["top"] == plain["top"]
  picture = _picture(answer["where_it_looked"])
  # The frame as the model saw it with the Grad-CAM map of the answer over it.
  trained = trained_run.load(trained_workdir)
  image = core.resize(image_files.read_image(frame)[1], 32).numpy()
  answer_id = trained.cmap.names.index(plain["top"][0]["character"])
  heat = explain.explainer(trained.config, trained.cmap.num_classes, trained.variables)(
    image[None], np.array([answer_id])
  )["grad_cam"][0]
  want = explain.overlay(image, heat)
  assert picture.shape == (32, 32, 3)
  assert np.abs(picture.astype(int) - want).max() <= 1
  status, refused = _request(f"{server}/predict?explain=maybe", frame.read_bytes())
  assert status == 400 and "ask with explain=1" in refused["error"]


@pytest.mark.slow
def test_an_exported_folder_serves_the_same_answers(
  trained_workdir, tiny_data_dir, tmp_path
):
  written = export.run(trained_workdir, formats=["jax"], output_dir=str(tmp_path))
  from_export = serve.Predictor(serve.load(written.folder), threshold=0.0)
  from_run = serve.Predictor(serve.load(trained_workdir), threshold=0.0)
  frame = sorted(tiny_data_dir.glob("*/*.jpg"))[5].read_bytes()
  a, b = from_export(frame, explain_answer=True), from_run(frame, True)
  assert a["character"] == b["character"]
  by_rule = [  # The run's own unknown rule, from the run and from its export.
    serve.Predictor(serve.load(folder), threshold="auto")(frame)["character"]
    for folder in (written.folder, trained_workdir)
  ]
  assert by_rule[0] == by_rule[1]
  for x, y in zip(a["top"], b["top"], strict=True):
    assert x["character"] == y["character"]
    assert x["probability"] == pytest.approx(y["probability"], abs=1e-5)
  looked_export, looked_run = (_picture(x["where_it_looked"]) for x in (a, b))
  assert np.abs(looked_export.astype(int) - looked_run).max() <= 1
  # An export written before explain.jax answers, and says it cannot draw.
  (written.folder / "explain.jax").unlink()
  card = json.loads((written.folder / "model.json").read_text())
  del card["files"]["explain.jax"]
  (written.folder / "model.json").write_text(json.dumps(card))
  older = serve.load(written.folder)
  assert older.explain is None
  with _serving(serve.create_app(older, threshold=0.0)) as port:
    status, answer = _request(f"http://127.0.0.1:{port}/predict", frame)
    assert status == 200 and answer["character"] == b["character"]
    status, answer = _request(f"http://127.0.0.1:{port}/predict?explain=1", frame)
  assert status == 400
  assert answer["error"] == (
    "this export cannot draw where the model looked (it has no explain.jax): "
    "export the run again, or serve the run itself"
  )


@pytest.mark.slow
def test_the_page_in_a_headless_browser_names_the_character(
  server, trained_workdir, tiny_data_dir, tmp_path
):
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
  if not (browser and driver_path):
    pytest.skip("no chromium and chromedriver here (.ci/run installs them)")
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
    options.add_argument(flag)
  driver = webdriver.Chrome(
    service=webdriver.ChromeService(executable_path=driver_path), options=options
  )
  try:
    driver.get(server)
    frame = sorted(tiny_data_dir.glob("*/*.jpg"))[3]
    (want,) = list(
      predict.classify_stream(
        trained_run.load(trained_workdir), [frame], threshold=0.99
      )
    )
    driver.find_element(By.ID, "file").send_keys(str(frame))
    shown = WebDriverWait(driver, 60).until(
      lambda d: d.find_element(By.ID, "character").get_attribute("data-name")
    )
    assert shown == want["character"]
    bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 3
    assert want["top"][0]["character"].replace("_", " ") in bars[0].text
    looked = driver.find_element(By.ID, "looked")
    assert not looked.is_displayed()
    driver.find_element(By.ID, "explain").click()  # "Where it looked": asks again.
    source = WebDriverWait(driver, 60).until(
      lambda d: looked.is_displayed() and looked.get_attribute("src")
    )
    assert _picture(source).shape == (32, 32, 3)
    assert driver.find_element(By.ID, "character").get_attribute("data-name") == shown
    driver.save_screenshot(str(tmp_path / "page.png"))
  finally:
    driver.quit()


def test_health_names_no_local_path_and_errors_speak_plainly(server, trained_workdir):
  status, health = _request(f"{server}/health")
  assert status == 200
  assert str(trained_workdir) not in json.dumps(health)
  assert health["model"].endswith(f"step {trained_run.load(trained_workdir).step}")
  # A JPEG header with damaged data: TensorFlow's decoder fails inside.
  damaged = _jpeg(64, 48)[:200] + b"\x00\x11" * 400
  status, answer = _request(f"{server}/predict", damaged)
  assert status == 415
  assert "TensorFlow" not in answer["error"] and "{{" not in answer["error"]
  assert "not usable: not a readable JPEG or PNG" in answer["error"]


def _jpeg(width: int, height: int) -> bytes:
  import io

  import numpy as np
  from PIL import Image

  pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "JPEG")
  return out.getvalue()


def test_a_multipart_upload_gets_the_same_answer_as_the_raw_body(server):
  image = _jpeg(40, 30)
  boundary = "simpsons-boundary"
  form = (
    (
      f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
      f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
      'filename="frame.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    ).encode()
    + image
    + f"\r\n--{boundary}--\r\n".encode()
  )
  request = urllib.request.Request(
    f"{server}/predict",
    data=form,
    method="POST",
    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
  )
  with urllib.request.urlopen(request, timeout=60) as response:
    from_form = json.loads(response.read())
  assert _request(f"{server}/predict", image) == (200, from_form)


def test_requests_waiting_together_run_as_one_batch_with_the_same_answers(
  trained_workdir, tiny_data_dir
):
  model = serve.load(trained_workdir)
  frames = [p.read_bytes() for p in sorted(tiny_data_dir.glob("*/*.jpg"))[:12]]
  one_at_a_time = serve.Predictor(model, threshold=0.0, max_batch=1)
  expected = [one_at_a_time(f) for f in frames]
  batches = []
  counted = dataclasses.replace(
    model,
    classify_with=lambda rule: (
      lambda images: batches.append(len(images)) or model.classify_with(rule)(images)
    ),
  )
  batched = serve.Predictor(counted, threshold=0.0, max_batch=8, batch_wait=0.2)
  batches.clear()  # The warm-up's.
  cut_short = frames[0][: len(frames[0]) // 2]  # Its header reads; its data does not.
  with concurrent.futures.ThreadPoolExecutor(13) as pool:
    answers = list(pool.map(batched, frames))
    damaged = pool.submit(batched, cut_short)
    answers += list(pool.map(batched, frames[:3]))
  assert len(batches) < len(frames)  # Some ran together...
  assert max(batches) <= 8 and all(b & (b - 1) == 0 for b in batches)  # padded
  for got, want in zip(answers, expected + expected[:3], strict=True):  # ...the same.
    assert [t["character"] for t in got["top"]] == [t["character"] for t in want["top"]]
    for a, b in zip(got["top"], want["top"], strict=True):
      assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)
  with pytest.raises(uploads.BadUpload) as refused:  # Only the damaged one fails.
    damaged.result()
  assert refused.value.status == 415 and "damaged" in str(refused.value)


def test_the_pixels_decoded_at_once_are_bounded(trained_workdir):
  model = serve.load(trained_workdir)
  image = _jpeg(300, 200)
  batches = []
  counted = dataclasses.replace(
    model,
    classify_with=lambda rule: (
      lambda images: batches.append(len(images)) or model.classify_with(rule)(images)
    ),
  )
  # Two images' worth of pixels: a batch never holds more, however many wait.
  answer = serve.Predictor(
    counted, 0.0, max_batch=8, batch_wait=0.2, decode_pixels=2 * 300 * 200
  )
  batches.clear()  # The warm-up's.
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    assert all(r["top"] for r in pool.map(answer, [image] * 8))
  assert max(batches) == 2 and sum(batches) >= 8
  tiny = serve.Predictor(model, 0.0, decode_pixels=1000, queue_timeout=0.01)
  assert tiny(image)["top"]  # Larger than the whole budget: decoded alone.
  busy = serve.Predictor(model, 0.0, decode_pixels=300 * 200, queue_timeout=0.01)
  assert busy.check(image) == 300 * 200  # Held, as by a request being decoded.
  with pytest.raises(uploads.BadUpload) as refused:
    busy(image)
  assert refused.value.status == 503 and "retry" in str(refused.value)


@pytest.fixture(scope="module")
def strict_server(trained_workdir):
  """The app with a 0.5 s limit on sending the body; its port."""
  with _serving(
    serve.create_app(serve.load(trained_workdir), body_timeout=0.5)
  ) as port:
    yield port


def test_a_slow_sender_is_timed_out_and_a_vanished_one_is_one_log_line(
  strict_server, server, caplog
):
  head = (
    b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n"
    b"Content-Length: 1000\r\n\r\n"
  )
  with socket.create_connection(("127.0.0.1", strict_server), timeout=10) as slow:
    slow.sendall(head + b"\xff\xd8")
    start = time.monotonic()
    reply = _whole_reply(slow)
  assert reply.startswith("HTTP/1.1 408") and "over 0.5 s" in reply
  assert time.monotonic() - start < 5
  with caplog.at_level("INFO", logger="absl"):  # Whatever verbosity absl was left at.
    # To the server with the default 30 s limit: the disconnect comes first.
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as gone:
      gone.sendall(head + b"\xff\xd8\xff")
    for _ in range(100):  # The server notices within its event loop's turn.
      if any("went away mid-upload" in r.getMessage() for r in caplog.records):
        break
      time.sleep(0.05)
  assert any("went away mid-upload" in r.getMessage() for r in caplog.records)
  assert not any(r.exc_info for r in caplog.records)


def test_a_port_in_use_is_one_sentence_before_anything_is_printed(capsys):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use"):
      serve.run("/nonexistent", port=port)
  assert "Serving" not in capsys.readouterr().out
