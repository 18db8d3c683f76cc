"""How sure, and how it is told: calibration figures exact on hand-built
cases, a temperature that mends an over-confident model, thresholds chosen
for a precision, unknown characters scored, and every use of a run applying
its temperature."""

import json

import numpy as np
import pytest
from scipy.special import softmax

from simpsons_jax import calibration, evaluate, open_set, train
from simpsons_jax import trained as trained_run
from tests.conftest import make_tiny_config


def test_ece_and_nll_on_hand_built_probabilities():
  probabilities = np.array(
    [
      [0.9, 0.05, 0.05],  # bin 14 (0.8667, 0.9333]: right
      [0.05, 0.9, 0.05],  # bin 14: wrong
      [0.6, 0.3, 0.1],  # bin 9 (0.5333, 0.6]: right
      [0.3, 0.3, 0.4],  # bin 6 (0.3333, 0.4]: wrong
    ]
  )
  labels = np.array([0, 0, 0, 0])
  # |0.5 - 0.9| * 2 + |1 - 0.6| + |0 - 0.4|, over 4 images.
  assert calibration.ece(probabilities, labels) == pytest.approx(1.6 / 4, abs=1e-12)
  bins = calibration.reliability(probabilities, labels)
  assert bins["count"].tolist() == [0] * 5 + [1, 0, 0, 1] + [0] * 4 + [2, 0]
  assert calibration.nll(probabilities, labels) == pytest.approx(
    -np.log([0.9, 0.05, 0.6, 0.3]).mean()
  )
  perfect = np.eye(3)[[0, 1, 2]]
  assert calibration.ece(perfect, np.array([0, 1, 2])) == 0.0


def test_the_temperature_mends_an_over_confident_model_and_keeps_every_answer():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(20000, 5)) * 2.0
  labels = np.array([rng.choice(5, p=p) for p in softmax(logits, axis=1)])
  over_confident = softmax(3.0 * logits, axis=1)  # The true T is 3.
  temperature = calibration.fit_temperature(over_confident, labels)
  assert temperature == pytest.approx(3.0, rel=0.05)
  mended = calibration.with_temperature(over_confident, temperature)
  assert calibration.nll(mended, labels) < calibration.nll(over_confident, labels)
  assert (
    calibration.ece(mended, labels) < 0.02 < calibration.ece(over_confident, labels)
  )
  np.testing.assert_array_equal(mended.argmax(1), over_confident.argmax(1))
  np.testing.assert_allclose(calibration.with_temperature(mended, 1.0), mended)


def test_the_threshold_is_the_lowest_that_keeps_the_precision():
  confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7])
  correct = np.array([1, 1, 0, 1, 0])  # Precision of the top k: 1, 1, 2/3, 3/4, 3/5.
  pick = calibration.threshold_for_precision
  assert pick(confidence, correct, 0.75) == (0.8, 0.8)
  assert pick(confidence, correct, 0.9) == (0.95, 0.4)
  assert pick(confidence, correct, 0.5) == (0.7, 1.0)
  assert pick(np.array([0.9, 0.9]), np.array([1, 0]), 0.9)[1] == 0.0  # Ties together.
  # The third image counting twice: precision 1, 1, 2/4, 3/5, 3/6.
  weights = np.array([1, 1, 2, 1, 1])
  assert pick(confidence, correct, 0.6, weights) == (0.8, 5 / 6)
  assert pick(confidence, correct, 0.75, weights) == (0.95, 2 / 6)
  fitted = {"validation": {"confidence": confidence.tolist(), "correct": correct}}
  chosen, said = calibration.threshold("auto:precision=0.75", fitted)
  assert chosen == 0.8 and "answers 80.0% of the validation images" in said
  assert calibration.threshold("0.5", fitted) == (0.5, "")
  with pytest.raises(ValueError, match="give auto, a probability"):
    calibration.threshold("auto:precision=high", fitted)
  with pytest.raises(ValueError, match="no calibration"):
    calibration.threshold("auto:precision=0.9", {})


def test_auroc_counts_pairs_and_half_ties():
  assert calibration.auroc(np.array([0.9, 0.8]), np.array([0.8, 0.1])) == 3.5 / 4
  assert calibration.auroc(np.array([1.0, 2.0]), np.array([3.0])) == 0.0


def test_training_calibrates_and_every_use_applies_the_temperature(trained_workdir):
  records = calibration.load(trained_workdir)
  trained = trained_run.load(trained_workdir, "latest")
  assert str(trained.step) in records
  assert trained.temperature == records[str(trained.step)]["temperature"] != 1.0
  fitted = records[str(trained.step)]
  assert fitted["nll"]["after"] <= fitted["nll"]["before"]
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8)
  calibrated, scores = trained_run.classifier(trained, 8)(images)
  raw = trained_run.softmax_probabilities(
    trained.model.apply, trained.variables, images, flip=False
  )
  np.testing.assert_allclose(
    calibrated,
    calibration.with_temperature(np.asarray(raw), trained.temperature),
    atol=1e-6,
  )
  np.testing.assert_array_equal(scores, calibrated.max(-1))  # No rule: max prob.


@pytest.mark.slow
def test_held_out_characters_are_scored_as_unknown(tiny_data_dir, tmp_path):
  config = make_tiny_config(tiny_data_dir)
  held = sorted(p.name for p in tiny_data_dir.iterdir())[:2]
  config.data.hold_out = tuple(held)
  config.data.val_fraction = 0.3  # 24 validation images: enough to calibrate.
  train.train_and_evaluate(config, tmp_path)
  names = json.loads((tmp_path / "characters.json").read_text())
  assert not set(held) & set(names["names"])
  report = evaluate.run(tmp_path, unknown_dir=str(tiny_data_dir), checkpoint="latest")
  unknown = report["unknown"]
  assert unknown["unknown_images"] == 40 and unknown["known_images"] == 24
  assert set(unknown["auroc"]) == set(open_set.SCORES)
  assert all(0 <= a <= 1 for a in unknown["auroc"].values())
  assert 0 <= unknown["unknowns_answered_unknown"] <= 1
  assert report["calibration"]["fitted"]
  at_95 = report["calibration"]["at_95_precision"]
  # Without negatives the run's own rule is the 95%-precision threshold.
  assert unknown["score"] == "max_probability"
  assert unknown["threshold"] == pytest.approx(at_95["threshold"], abs=1e-6)
  assert unknown["known_answered"] == pytest.approx(at_95["answered"], abs=0.05)
  # On the split the threshold was chosen on, the answered images reach 95%.
  assert at_95["answered"] == 0 or at_95["precision"] >= 0.95
  assert (tmp_path / "eval" / "validation" / "reliability.png").exists()
  config.data.hold_out = ("nobody",)
  with pytest.raises(ValueError, match="hold_out names characters the data has none"):
    train.train_and_evaluate(config, tmp_path / "other")


def test_predict_video_and_serve_give_the_same_calibrated_probabilities(
  trained_workdir, tiny_data_dir, tmp_path
):
  """(The exported files equal predict too: tests/test_export.py.)"""
  pytest.importorskip("av")
  from PIL import Image

  from simpsons_jax import predict, serve, video
  from tests.test_video import write_clip

  trained = trained_run.load(trained_workdir)
  assert trained.temperature != 1.0
  names, size = trained.cmap.names, (64, 48)
  frames = [
    np.asarray(Image.open(p).convert("RGB").resize(size))
    for p in sorted(tiny_data_dir.glob("*/*.jpg"))[::11][:6]
  ]
  paths = []
  for i, frame in enumerate(frames):
    paths.append(tmp_path / f"{i}.png")
    Image.fromarray(frame).save(paths[-1])
  # A lossless video of the same frames (the PNG codec keeps every pixel).
  write_clip(tmp_path / "clip.mov", frames, 1, "png", "rgb24", size)

  def table(answers):
    """Each answer's probabilities in the characters' order."""
    rows = [{t["character"]: t["probability"] for t in a["top"]} for a in answers]
    return np.array([[row[name] for name in names] for row in rows])

  by_predict = table(predict.classify_stream(trained, paths, top_k=len(names)))
  by_video = video.analyse(
    tmp_path / "clip.mov",
    trained_run.classifier(trained, 4),
    trained.config.data.image_size,
    video.Options(fps=0.0),
  ).probabilities
  server = serve.Predictor(serve.load(trained_workdir), threshold=0.0, top_k=len(names))
  by_serve = table(server(path.read_bytes()) for path in paths)
  assert by_predict.shape == (6, len(names))
  np.testing.assert_allclose(by_video, by_predict, atol=1e-5)
  np.testing.assert_allclose(by_serve, by_predict, atol=1e-5)
  uncalibrated = calibration.with_temperature(by_predict, 1 / trained.temperature)
  assert np.abs(uncalibrated - by_predict).max() > 1e-3  # The temperature matters.
