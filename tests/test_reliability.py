"""Never destroy a user's file, never trust a damaged one, never hang: each
kind of fault of docs/reliability.md's table, on the smallest case that shows it."""

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from absl import flags

from simpsons_jax import (
  calibration,
  characters,
  checkpointing,
  config_keys,
  connections,
  errors,
  evaluate,
  export,
  files,
  image_files,
  modes,  # noqa: F401 - defines the shared flags checked below.
  predict,
  serve,
  train,
)
from simpsons_jax import trained as trained_run
from simpsons_jax.modes import predict as predict_mode  # noqa: F401 - its flags.
from simpsons_jax.modes import serve as serve_mode  # noqa: F401 - its flags.
from tests.conftest import make_tiny_config

FLAGS = flags.FLAGS


@pytest.fixture
def run_copy(trained_workdir, tmp_path):
  """A copy of the trained run, to damage."""
  return Path(shutil.copytree(trained_workdir, tmp_path / "run"))


@contextlib.contextmanager
def _deadline(seconds: int):
  """Fails the test instead of hanging it (SIGALRM in the main thread)."""

  def expired(*_):
    raise TimeoutError(f"still waiting after {seconds} s")

  previous = signal.signal(signal.SIGALRM, expired)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# Every file read back is checked before it is trusted.


@pytest.mark.parametrize(
  "temperature, why",
  [
    (-0.68, "temperature -0.68: it must be a finite number above 0"),
    (0, "temperature 0: it must be"),
    (float("nan"), "temperature nan: it must be"),
    ([1.0], r"temperature \[1.0\]: it must be"),
  ],
)
def test_a_calibration_that_would_invert_or_void_answers_is_refused(
  run_copy, temperature, why
):
  path = run_copy / calibration.FILENAME
  records = json.loads(path.read_text())
  for record in records.values():
    record["temperature"] = temperature
  path.write_text(json.dumps(records))
  with pytest.raises(files.DamagedFileError, match=f"is damaged \\({why}.*T = 1"):
    trained_run.load(run_copy)


@pytest.mark.parametrize(
  "content, why",
  [
    ("[1.0, 2.0]", "not a JSON object"),
    ('{"best": {}}', "a key 'best'"),
    ('{"12": [0.7]}', "a list, not a JSON object"),
    (
      '{"12": {"temperature": 0.7, "validation": {"confidence": [0.5], '
      '"correct": []}}}',
      "1 validation confidences but 0 answers",
    ),
    (
      '{"12": {"temperature": 0.7, "validation": {"confidence": [1.5], '
      '"correct": [1]}}}',
      r"a validation confidence outside \[0, 1\]",
    ),
  ],
)
def test_a_calibration_file_of_the_wrong_shape_is_one_sentence(run_copy, content, why):
  (run_copy / calibration.FILENAME).write_text(content)
  with pytest.raises(files.DamagedFileError, match=why):
    calibration.load(run_copy)


def test_an_auto_threshold_on_a_run_too_small_to_calibrate_says_so():
  with pytest.raises(errors.UserError, match="had 12 images, too few to calibrate"):
    calibration.threshold("auto:precision=0.95", calibration.not_fitted(12))
  with pytest.raises(errors.UserError, match="trained before it existed"):
    calibration.threshold("auto:precision=0.95", {})


def _edit_config(run: Path, edit) -> None:
  path = run / checkpointing.CONFIG_FILENAME
  saved = json.loads(path.read_text())
  edit(saved)
  path.write_text(json.dumps(saved))


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      lambda c: c["data"].update(crop_to_face=True),
      r"keys this version does not know \(data.crop_to_face\): it was written by a "
      "newer simpsons_jax",
    ),
    (
      lambda c: c["data"].update(image_size="abc"),
      "is damaged \\(data.image_size is 'abc', not an integer\\)",
    ),
    (
      lambda c: c["train"].update(num_epochs=2.5),
      "train.num_epochs is 2.5, not an integer",
    ),
    (lambda c: c["optim"].pop("learning_rate"), "it lacks optim.learning_rate"),
    (
      lambda c: c["model"].update(name="vit", vit={"patch": 4}),
      "names the model 'vit', which this version does not have",
    ),
  ],
)
def test_a_config_json_from_a_newer_version_or_damaged_is_one_sentence(
  run_copy, edit, message
):
  _edit_config(run_copy, edit)
  with pytest.raises(errors.UserError, match=message) as raised:
    checkpointing.load_config(run_copy)
  assert "--config.model.name" not in str(raised.value)  # A flag nobody passed.


def test_a_config_json_with_a_newer_key_is_not_resumed_over(run_copy, tiny_data_dir):
  _edit_config(run_copy, lambda c: c["train"].update(new_knob=1))
  before = (run_copy / checkpointing.CONFIG_FILENAME).read_text()
  with pytest.raises(errors.UserError, match="train.new_knob"):
    train.train_and_evaluate(make_tiny_config(tiny_data_dir), run_copy)
  assert (run_copy / checkpointing.CONFIG_FILENAME).read_text() == before


def test_a_characters_json_with_repeated_names_is_refused(run_copy):
  path = run_copy / characters.MAP_FILENAME
  saved = json.loads(path.read_text())
  saved["names"][1] = saved["names"][0]
  path.write_text(json.dumps(saved))
  with pytest.raises(files.DamagedFileError, match="must be distinct"):
    trained_run.load(run_copy)


@pytest.fixture(scope="module")
def export_folder(trained_workdir, tmp_path_factory):
  written = export.run(
    trained_workdir, formats=("jax",), output_dir=tmp_path_factory.mktemp("export")
  )
  return Path(written.folder)


def _resealed(folder: Path, tmp_path: Path) -> Path:
  """A copy of `folder` whose model.json lists its files as they are now (as
  a hand edit that redid the hashes would)."""
  card_path = folder / "model.json"
  card = json.loads(card_path.read_text())
  card["files"] = export.manifest(files.as_path(folder))
  card_path.write_text(json.dumps(card))
  return folder


def test_an_export_whose_files_disagree_is_refused_naming_the_file(
  export_folder, tmp_path
):
  fewer = Path(shutil.copytree(export_folder, tmp_path / "fewer"))
  names = json.loads((fewer / "characters.json").read_text())
  (fewer / "characters.json").write_text(json.dumps(names[:-1]))
  with pytest.raises(export.ExportMismatch, match="characters.json lists other"):
    export.open_folder(_resealed(fewer, tmp_path))

  both = Path(shutil.copytree(export_folder, tmp_path / "both"))
  (both / "characters.json").write_text(json.dumps(names[:-1]))
  card = json.loads((both / "model.json").read_text())
  card["characters"] = names[:-1]
  (both / "model.json").write_text(json.dumps(card))
  with pytest.raises(
    export.ExportMismatch,
    match=f"model.jax gives {len(names)} probabilities for {len(names) - 1}",
  ):
    export.open_folder(_resealed(both, tmp_path))

  cut = Path(shutil.copytree(export_folder, tmp_path / "cut"))
  data = (cut / "explain.jax").read_bytes()
  (cut / "explain.jax").write_bytes(data[: len(data) // 3])
  with pytest.raises(export.ExportMismatch, match="explain.jax is damaged"):
    serve.load(_resealed(cut, tmp_path))

  cold = Path(shutil.copytree(export_folder, tmp_path / "cold"))
  card = json.loads((cold / "model.json").read_text())
  card["calibration"] = {"temperature": -1.0}
  (cold / "model.json").write_text(json.dumps(card))
  with pytest.raises(files.DamagedFileError, match="temperature -1.0"):
    serve.load(cold)
  assert export.open_folder(export_folder).names == tuple(names)


def test_an_export_with_no_formats_writes_and_removes_nothing(
  trained_workdir, export_folder
):
  before = sorted(p.name for p in export_folder.iterdir())
  with pytest.raises(errors.UserError, match="--formats is empty.*nothing was"):
    export.run(trained_workdir, formats=[""], output_dir=export_folder.parent)
  assert sorted(p.name for p in export_folder.iterdir()) == before


def test_an_export_never_replaces_a_folder_that_is_not_an_export(run_copy):
  checkpoints = run_copy / "checkpoints"
  steps = sorted(p.name for p in checkpoints.iterdir())
  with pytest.raises(errors.UserError, match="is not an export .* --output_dir"):
    export.run(run_copy, "latest", formats=("jax",), output_dir=checkpoints)
  assert sorted(p.name for p in checkpoints.iterdir()) == steps


# No write lands on an input.


def test_an_output_is_compared_with_every_input_however_it_is_named(tmp_path):
  image = tmp_path / "frames" / "x.jpg"
  image.parent.mkdir()
  image.write_bytes(b"a user's picture")
  (tmp_path / "link.jpg").symlink_to(image)
  os.link(image, tmp_path / "hard.jpg")
  for same in (
    image,
    tmp_path / "frames" / ".." / "frames" / "x.jpg",
    tmp_path / "link.jpg",
    tmp_path / "hard.jpg",
  ):
    with pytest.raises(errors.UserError, match=f"--output={same} is also an input"):
      files.refuse_writing_inputs({"--output": same}, [image])
  with pytest.raises(errors.UserError, match="--annotate_video and --output name"):
    files.refuse_writing_inputs(
      {"--output": tmp_path / "a.out", "--annotate_video": tmp_path / "a.out"}, []
    )
  files.refuse_writing_inputs({"--output": tmp_path / "new.jsonl", "x": ""}, [image])
  assert image.read_bytes() == b"a user's picture"


def test_predict_refuses_to_write_over_an_input_before_loading(tmp_path):
  image = tmp_path / "x.jpg"
  image.write_bytes(b"a user's picture")
  clip = tmp_path / "clip.mp4"
  clip.write_bytes(b"a user's video")
  cases = [
    ({"output": str(image)}, "--output=.* is also an input"),
    (
      {"annotate_video": str(clip), "paths": [str(clip)]},
      "--annotate_video=.* is also an input",
    ),
    ({"annotate_video": str(tmp_path / "a.txt")}, "name a video file"),
    ({"output": str(tmp_path)}, "is a folder: name a file"),
    (
      {"paths": [str(clip), str(tmp_path / "b" / "clip.mp4")]},
      "would write the same files",
    ),
  ]
  for options, message in cases:
    paths = options.pop("paths", [str(image)])
    # The workdir does not exist: the check comes before the model loads.
    with pytest.raises(errors.UserError, match=message):
      predict.run(tmp_path / "no_run", paths, **options)
  assert image.read_bytes() == b"a user's picture"
  assert clip.read_bytes() == b"a user's video"


def test_explanations_reach_the_output_and_stale_drawings_go(
  trained_workdir, tiny_data_dir, tmp_path
):
  stale = tmp_path / "explain" / "0007_old.png"
  stale.parent.mkdir()
  stale.write_bytes(b"an earlier run's drawing")
  mine = tmp_path / "explain" / "notes.txt"
  mine.write_text("kept")
  frames = sorted((tiny_data_dir / "clown").glob("*"))[:2]
  out = tmp_path / "out.jsonl"
  predict.run(
    trained_workdir,
    [str(p) for p in frames],
    output=str(out),
    output_dir=str(tmp_path),
    explain_images=True,
  )
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [Path(line["explanation"]).name for line in lines] == [
    f"{i:04d}_{p.stem}.png" for i, p in enumerate(frames)
  ]
  assert all(Path(line["explanation"]).exists() for line in lines)
  assert not stale.exists() and mine.read_text() == "kept"
  with pytest.raises(errors.UserError, match="lies in .*explain"):
    predict.run(
      trained_workdir,
      [lines[0]["explanation"]],
      output_dir=str(tmp_path),
      explain_images=True,
    )


def test_evaluate_removes_only_its_own_figures(trained_workdir, tmp_path):
  folder = tmp_path / "validation"
  folder.mkdir()
  (folder / "holiday.png").write_bytes(b"a user's picture")
  report = evaluate.run(trained_workdir, output_dir=tmp_path)
  assert (folder / "holiday.png").read_bytes() == b"a user's picture"
  assert "holiday.png" not in report["figures"]
  assert "confusion_matrix.png" in report["figures"]


# Nothing waits forever.


def test_a_fifo_among_the_images_is_skipped_not_waited_on(
  trained_workdir, tiny_data_dir, tmp_path
):
  folder = tmp_path / "frames"
  shutil.copytree(tiny_data_dir / "clown", folder)
  os.mkfifo(folder / "b.jpg")
  with _deadline(60):
    verdict, _ = image_files.read_image(files.as_path(folder / "b.jpg"))
    results = list(predict.classify_stream(trained_run.load(trained_workdir), [folder]))
  assert "named pipe (FIFO)" in verdict.reason
  by_name = {Path(r["path"]).name: r for r in results}
  assert "named pipe" in by_name["b.jpg"]["error"]
  assert sum("character" in r for r in results) == len(results) - 1
  (tmp_path / "c.json").unlink(missing_ok=True)
  os.mkfifo(tmp_path / "c.json")
  with _deadline(10), pytest.raises(files.DamagedFileError, match="named pipe"):
    files.read_json(tmp_path / "c.json", "fix")


@contextlib.contextmanager
def _bounded_server(header_timeout: float, max_open: int):
  import uvicorn
  from fastapi import FastAPI

  app = FastAPI()
  app.get("/health")(lambda: {"status": "ok"})
  listener = serve.listening_socket("127.0.0.1", 0)
  protocol = connections.bounded_protocol(header_timeout, max_open)
  server = uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="warning"))
  thread = threading.Thread(target=server.run, args=([listener],), daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.02)
  try:
    yield listener.getsockname()[1]
  finally:
    server.should_exit = True
    thread.join(timeout=10)


def _half_open(port: int) -> socket.socket:
  """A connection that sends half a request header and waits."""
  half = socket.create_connection(("127.0.0.1", port), timeout=10)
  half.sendall(b"GET /health HTTP/1.1\r\nHost: loc")
  return half


def _health(port: int) -> bytes:
  with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
    client.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return client.recv(4096)


def test_serve_drops_unfinished_headers_and_caps_connections():
  pytest.importorskip("uvicorn")
  with _bounded_server(header_timeout=0.5, max_open=4) as port:
    slow = _half_open(port)
    start = time.monotonic()
    assert slow.recv(100) == b""  # Closed by the server.
    assert time.monotonic() - start < 5
    halves = [_half_open(port) for _ in range(4)]
    assert b'"ok"' in _health(port)  # Past the cap: the oldest half goes.
    assert halves[0].recv(100) == b""
    for half in [slow, *halves]:
      half.close()


def test_port_zero_serves_on_the_port_the_system_picked():
  with contextlib.closing(serve.listening_socket("127.0.0.1", 0)) as listener:
    assert listener.getsockname()[1] > 0


def test_a_model_that_cannot_fit_is_refused_before_anything_is_written(
  tiny_config, tmp_path
):
  tiny_config.data.image_size = 100_000
  workdir = tmp_path / "run"
  with pytest.raises(errors.UserError, match=r"needs at least .* TB .*parameters"):
    train.train_and_evaluate(tiny_config, workdir)
  assert not workdir.exists()  # The corrected command starts afresh.


# Each mistake is one sentence naming the flag, the value and the fix.


@pytest.mark.parametrize(
  "name, bad, good",
  [
    ("top_k", [0, -1], [1, 5]),
    ("threshold", ["nan", "inf", "2", "-0.1", "x"], ["0", "0.8", "auto:precision=0.9"]),
    ("port", [70000, -1], [0, 8000]),
    ("max_batch", [0], [1]),
    ("batch_wait_ms", [-1.0, math.nan], [0.0]),
    ("video_fps", [-2.0, math.inf], [0.0, 2.0]),
    ("smooth_window", [0], [1]),
  ],
)
def test_flags_are_range_checked_where_they_are_defined(name, bad, good):
  for value in bad:
    with pytest.raises(flags.IllegalFlagValueError, match=f"--{name} takes"):
      setattr(FLAGS, name, value)
  for value in good:
    setattr(FLAGS, name, value)
  FLAGS[name].value = FLAGS[name].default


def test_a_missing_or_broken_config_file_is_one_sentence(tmp_path):
  with pytest.raises(config_keys.ConfigFileError, match="does not exist.* demo.py"):
    config_keys.check_config_file(["main.py", "--config=configs/ful.py"])
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  with pytest.raises(SyntaxError) as raised:
    config_keys.load_config_file(str(broken))
  said = config_keys.syntax_error(raised.value)
  assert said.startswith(f"--config={broken}: ") and "line 1" in said


def test_hold_out_mistakes_are_said_before_anything_is_written(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  tiny_config.data.hold_out = ("nobody",)
  with pytest.raises(characters.DatasetError, match="has none of \\(nobody\\)"):
    train.train_and_evaluate(tiny_config, workdir)
  assert not workdir.exists()
  tiny_config.data.hold_out = tuple(
    p.name for p in Path(tiny_config.data.dir).iterdir() if p.is_dir()
  )
  with pytest.raises(characters.DatasetError, match="holds out every character"):
    train.train_and_evaluate(tiny_config, workdir)
  assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_one_sentence(tiny_config, tmp_path):
  (tmp_path / "run").write_text("a user's notes")
  with pytest.raises(errors.UserError, match="--workdir=.* is a file, not a folder"):
    train.train_and_evaluate(tiny_config, tmp_path / "run")
  assert (tmp_path / "run").read_text() == "a user's notes"


def test_a_pixel_limit_that_skips_everything_names_the_limit(tiny_config, tmp_path):
  tiny_config.data.max_image_pixels = 1
  with pytest.raises(characters.DatasetError, match="max_image_pixels"):
    train.train_and_evaluate(tiny_config, tmp_path / "run")


def test_a_missing_unknown_or_eval_folder_is_said_before_loading(
  trained_workdir, monkeypatch
):
  def never(*_args, **_kwargs):
    raise AssertionError("the model was loaded")

  monkeypatch.setattr(trained_run, "load", never)
  with pytest.raises(characters.DatasetError, match="point --unknown_dir at"):
    evaluate.run(trained_workdir, unknown_dir="/nonexistent/others")
  with pytest.raises(characters.DatasetError, match="point --eval_dir at"):
    evaluate.run(trained_workdir, eval_dir="/nonexistent/testset")
