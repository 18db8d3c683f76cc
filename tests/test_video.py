"""Videos in --mode=predict: sampling, segments, tables, timeline, annotation."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import default
from simpsons_jax import answers, predict, synthetic, train, video
from tests.conftest import SHARED_DATA

av = pytest.importorskip("av", reason='the video extra: pip install -e ".[video]"')

ROOT = Path(__file__).resolve().parents[1]
FPS = 10  # Of the test clips.
SIZE = (160, 120)  # Width, height of the test clips.


def write_clip(
  path: Path,
  frames,
  fps: int = FPS,
  codec: str = "libx264",
  pix_fmt: str = "yuv420p",
  size: tuple[int, int] = SIZE,
) -> None:
  """Encodes RGB uint8 frames (all `size`) as a video at `fps` (codec 'png',
  pix_fmt 'rgb24': every pixel kept)."""
  with av.open(str(path), "w") as sink:
    stream = sink.add_stream(codec, rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = pix_fmt
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        sink.mux(packet)
    for packet in stream.encode():
      sink.mux(packet)


def _frame(path: Path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB").resize(SIZE))


# --- the parts, on hand-built numbers ----------------------------------------


def test_smooth_is_a_centred_moving_average_shortened_at_the_ends():
  p = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
  np.testing.assert_allclose(
    video.smooth(p, 3),
    [[0.5, 0.5], [2 / 3, 1 / 3], [2 / 3, 1 / 3], [1.0, 0.0]],
  )
  np.testing.assert_array_equal(video.smooth(p, 1), p)


def test_segments_labels_and_screen_time_on_hand_built_samples():
  names = ["bart", "homer"]
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5], [0.2, 0.8], [0.1, 0.9]])
  labels = video.labels(probs, names, threshold=0.6)
  assert labels == ["bart", "bart", "unknown", "homer", "homer"]
  times = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
  found = video.segments(times, labels, interval=0.5, end=2.4)
  assert found == [
    {"character": "bart", "start": 0.0, "end": 1.0},
    {"character": "unknown", "start": 1.0, "end": 1.5},
    {"character": "homer", "start": 1.5, "end": 2.5},  # One interval past 2.0.
  ]
  assert video.screen_time(found) == {"bart": 1.0, "homer": 1.0, "unknown": 0.5}


def test_frames_are_sampled_by_their_timestamps(tmp_path):
  clip = tmp_path / "clip.mkv"
  write_clip(clip, [np.full((*SIZE[::-1], 3), i * 8, np.uint8) for i in range(30)])
  every = list(video.Frames(clip))
  assert [i for i, _, _ in every] == list(range(30))
  assert every[0][2].shape == (SIZE[1], SIZE[0], 3)
  sampled = list(video.Frames(clip, every=0.5))  # 2 per second of a 3 s clip.
  assert [i for i, _, _ in sampled] == [0, 5, 10, 15, 20, 25]
  np.testing.assert_allclose([t for _, t, _ in sampled], [0, 0.5, 1, 1.5, 2, 2.5])


def test_a_missing_extra_is_one_sentence(monkeypatch):
  monkeypatch.setitem(sys.modules, "av", None)  # import av then fails.
  with pytest.raises(ValueError, match=r'pip install -e "\.\[video\]"'):
    list(video.Frames("clip.mp4"))


def test_without_a_display_the_camera_is_a_clear_error(monkeypatch):
  monkeypatch.delenv("DISPLAY", raising=False)
  monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
  with pytest.raises(ValueError, match="no display here"):
    video.live(0, lambda x: x, ["a"], 32, 0.0, 3)
  monkeypatch.setenv("DISPLAY", ":99")
  if not Path("/dev/video7").exists():
    with pytest.raises(ValueError, match="no camera 7: /dev/video7 does not exist"):
      video.live(7, lambda x: x, ["a"], 32, 0.0, 3)


# --- end to end, with a model trained on the clip's frames --------------------

CHARACTERS = ("charles_montgomery_burns", "homer_simpson", "ned_flanders")


@pytest.fixture(scope="module")
def frames_workdir(tmp_path_factory):
  """Five frames of three characters (real ones where ../shared/data is
  present), and a run trained on them until it knows them."""
  data = tmp_path_factory.mktemp("frames")
  real = SHARED_DATA / "frames" / "train"
  if all((real / c).is_dir() for c in CHARACTERS):
    for c in CHARACTERS:
      (data / c).mkdir()
      for path in sorted((real / c).glob("*.jpg"))[:5]:
        shutil.copy(path, data / c / path.name)
  else:
    data = synthetic.generate(data / "synthetic", images_per_character=5)
  config = default.get_config()
  config.data.dir = str(data)
  config.data.min_images = 1
  config.data.image_size = 32
  config.data.val_fraction = 0.2
  config.model.simpsons_cnn.dense_features = (128,)
  config.model.simpsons_cnn.dropout_rate = 0.0
  config.train.batch_size = 8
  config.train.num_epochs = 60
  config.train.log_every_steps = 1000
  workdir = tmp_path_factory.mktemp("frames_run")
  train.train_and_evaluate(config, workdir)
  split = json.loads((workdir / "split.json").read_text())
  trained_frames = {}
  for key in split["in_use"]["train"]:
    character, name = key.split("/", 1)
    trained_frames.setdefault(character, []).append(_frame(data / character / name))
  return workdir, trained_frames


def _known_clip(path: Path, trained_frames: dict, rng) -> list:
  """Three characters' known frames, 4, 3.5 and 3 s long, 0.5 s of noise
  between them; returns the expected segments."""
  names = sorted(trained_frames)[:3]
  frames, expected, t = [], [], 0.0
  for index, (name, seconds) in enumerate(zip(names, (4.0, 3.5, 3.0), strict=True)):
    if index:
      frames += [rng.integers(0, 256, (*SIZE[::-1], 3), np.uint8) for _ in range(5)]
      t += 0.5
    shown = trained_frames[name]
    count = int(seconds * FPS)
    frames += [shown[(i // 5) % len(shown)] for i in range(count)]  # 0.5 s each
    expected.append((name, t, t + seconds))
    t += seconds
  write_clip(path, frames)
  return expected


@pytest.mark.slow
def test_a_clip_of_known_characters_gives_its_segments_table_and_timeline(
  frames_workdir, tmp_path
):
  workdir, trained_frames = frames_workdir
  clip = tmp_path / "clip.mp4"
  expected = _known_clip(clip, trained_frames, np.random.default_rng(0))
  out = tmp_path / "out"
  annotated = tmp_path / "annotated.mp4"
  results = predict.run(
    workdir,
    [str(clip)],
    threshold=0.5,
    checkpoint="latest",  # Trained to know its frames (best: by 3 images only).
    video_options=video.Options(fps=2.0, smooth_window=3),
    output_dir=str(out),
    annotate_video=str(annotated),
  )
  (result,) = results
  found = [s for s in result["segments"] if s["character"] != answers.UNKNOWN]
  assert [s["character"] for s in found] == [name for name, _, _ in expected]
  for s, (_, start, end) in zip(found, expected, strict=True):
    assert abs(s["start"] - start) <= 0.5 + 1e-6  # One sampling interval.
    assert abs(s["end"] - end) <= 0.5 + 1e-6
  assert result["stopped"] == ""

  with open(out / "clip.frames.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 23  # 11.5 s at 2 frames per second.
  assert [float(r["time"]) for r in rows] == [i / 2 for i in range(23)]
  assert list(rows[0]) == ["time", "character"] + [
    f"{k}{i}" for i in (1, 2, 3) for k in ("top", "probability")
  ]
  saved = json.loads((out / "clip.segments.json").read_text())
  assert saved["segments"] == result["segments"]
  assert saved["frames_decoded"] == 115
  assert sum(saved["screen_time"].values()) == pytest.approx(11.5)
  with Image.open(out / "clip.timeline.png") as picture:
    assert picture.format == "PNG" and picture.width > 400

  assert result["annotated_frames"] == 115
  with av.open(str(annotated)) as container:
    stream = container.streams.video[0]
    frames = list(container.decode(stream))
  assert len(frames) == 115
  assert (frames[0].width, frames[0].height) == SIZE
  # The caption's dark box is drawn in the top-left corner.
  assert frames[20].to_ndarray(format="rgb24")[10:14, 10:40].mean() < 60


@pytest.mark.slow
def test_a_truncated_video_gives_what_decodes_and_a_non_video_is_skipped(
  frames_workdir, tmp_path, capsys
):
  workdir, trained_frames = frames_workdir
  clip = tmp_path / "clip.mkv"  # Matroska streams: its start decodes alone.
  _known_clip(clip, trained_frames, np.random.default_rng(0))
  data = clip.read_bytes()
  cut = tmp_path / "cut.mkv"
  cut.write_bytes(data[: len(data) // 2])
  fake = tmp_path / "notes.mp4"
  fake.write_text("not a video\n")
  results = predict.run(
    workdir,
    [str(cut), str(fake)],
    checkpoint="latest",
    output_dir=str(tmp_path / "out"),
    video_options=video.Options(fps=2.0),
  )
  truncated, skipped = results
  assert truncated["stopped"]  # Where it stopped, and why.
  saved = json.loads((tmp_path / "out" / "cut.segments.json").read_text())
  assert 0 < saved["frames_decoded"] < 115
  assert saved["stopped"] == truncated["stopped"]
  # Screen time counts what was decoded, not the header's 11.5 s.
  with open(tmp_path / "out" / "cut.frames.csv", newline="") as f:
    last_sample = float(list(csv.DictReader(f))[-1]["time"])
  assert saved["seconds_read"] <= last_sample + 0.5 + 1e-6
  assert saved["seconds_read"] < saved["duration"]
  assert saved["segments"][-1]["end"] == pytest.approx(saved["seconds_read"])
  assert sum(saved["screen_time"].values()) <= saved["seconds_read"] + 1e-6
  assert "not a video" in skipped["error"]
  printed = capsys.readouterr().out
  assert f"{fake}: skipped: not a video" in printed
  assert "warning: " in printed
  assert f"{saved['seconds_read']:.1f} s read" in printed


def test_an_unwritable_output_folder_stops_before_decoding(
  trained_workdir, tmp_path, monkeypatch
):
  workdir = trained_workdir
  clip = tmp_path / "clip.mp4"
  write_clip(clip, [np.zeros((*SIZE[::-1], 3), np.uint8)] * 4)
  blocker = tmp_path / "file"
  blocker.write_text("")
  monkeypatch.setattr(video, "analyse", lambda *a: pytest.fail("decoded first"))
  with pytest.raises(ValueError, match=f"cannot write to {blocker}/out.*--output_dir"):
    predict.run(workdir, [str(clip)], output_dir=str(blocker / "out"))


@pytest.mark.slow
def test_the_command_line_prints_screen_time(frames_workdir, tmp_path):
  workdir, trained_frames = frames_workdir
  clip = tmp_path / "clip.webm"
  names = sorted(trained_frames)
  write_clip(clip, [trained_frames[names[0]][0]] * 20, codec="libvpx-vp9")
  result = subprocess.run(
    [sys.executable, "main.py", "--mode=predict", f"--workdir={workdir}", str(clip)]
    + [f"--output_dir={tmp_path / 'out'}", "--video_fps=0", "--checkpoint=latest"]
    + ["--threshold=0"],  # Every frame named: the screen time of each character.
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "XLA_FLAGS": "", "OMP_NUM_THREADS": "1"},
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"{clip}: 20 frames classified of 20 decoded, 2.0 s" in result.stdout
  assert names[0] in result.stdout.split("decoded")[1]
  assert (tmp_path / "out" / "clip.timeline.png").exists()
