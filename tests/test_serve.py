"""--mode=serve: the JSON API over real HTTP, and the page in a headless browser."""

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from simpsons_jax import export, predict, serve

pytest.importorskip("fastapi", reason='the serve extra: pip install -e ".[serve]"')
uvicorn = pytest.importorskip("uvicorn")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_workdir):
  """The app on localhost in a thread, with a 200 KB body limit."""
  app = serve.create_app(serve.load(trained_workdir), threshold=0.99, max_bytes=200_000)
  port = _free_port()
  config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
  running = uvicorn.Server(config)
  thread = threading.Thread(target=running.run, daemon=True)
  thread.start()
  for _ in range(200):
    if running.started:
      break
    time.sleep(0.05)
  yield f"http://127.0.0.1:{port}"
  running.should_exit = True
  thread.join(timeout=10)


def _request(url: str, data: bytes | None = None) -> tuple[int, dict]:
  request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_the_api_answers_as_predict_does(server, trained_workdir, tiny_data_dir):
  trained = predict.load(trained_workdir)
  status, health = _request(f"{server}/health")
  assert status == 200 and health["status"] == "ok"
  assert health["characters"] == trained.cmap.num_classes
  assert _request(f"{server}/characters") == (200, list(trained.cmap.names))
  frames = sorted(tiny_data_dir.glob("*/*.jpg"))[::17][:4]
  expected = predict.classify(trained, frames, top_k=3, threshold=0.99)
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


def test_an_exported_folder_serves_the_same_answers(trained_workdir, tiny_data_dir):
  written = export.run(trained_workdir, formats=["jax"])
  from_export = serve.predictor(serve.load(written.folder), threshold=0.0)
  from_run = serve.predictor(serve.load(trained_workdir), threshold=0.0)
  frame = sorted(tiny_data_dir.glob("*/*.jpg"))[5].read_bytes()
  a, b = from_export(frame), from_run(frame)
  assert a["character"] == b["character"]
  for x, y in zip(a["top"], b["top"], strict=True):
    assert x["character"] == y["character"]
    assert x["probability"] == pytest.approx(y["probability"], abs=1e-5)


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
    (want,) = predict.classify(predict.load(trained_workdir), [frame], threshold=0.99)
    driver.find_element(By.ID, "file").send_keys(str(frame))
    shown = WebDriverWait(driver, 60).until(
      lambda d: d.find_element(By.ID, "character").get_attribute("data-name")
    )
    assert shown == want["character"]
    bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 3
    assert want["top"][0]["character"].replace("_", " ") in bars[0].text
    driver.save_screenshot(str(tmp_path / "page.png"))
  finally:
    driver.quit()
