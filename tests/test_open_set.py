"""Saying "I don't know": the negatives' objective, the unknown scores, their
choice on the validation split alone, prediction sets with their coverage,
and one answer from predict, serve and an export."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simpsons_jax import (
  calibration,
  characters,
  data,
  evaluate,
  export,
  files,
  losses,
  open_set,
  predict,
  serve,
  splits,
  synthetic,
  train,
)
from simpsons_jax import trained as trained_run
from tests.conftest import make_tiny_config


def test_negatives_train_towards_the_uniform_answer():
  logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]])
  labels = jnp.asarray([0, -1, -1])
  found = losses.objective(logits, labels, negatives_weight=0.5)
  expected_known = -jax.nn.log_softmax(logits[0])[0]
  np.testing.assert_allclose(found[0], expected_known, rtol=1e-6)
  np.testing.assert_allclose(found[1], 0.5 * np.log(3), rtol=1e-6)  # Its minimum.
  uniform = jax.nn.logsumexp(logits[2]) - logits[2].mean()
  np.testing.assert_allclose(found[2], 0.5 * uniform, rtol=1e-6)
  # The gradient pulls a negative's softmax to 1/K: w (softmax(z) - 1/K).
  grad = jax.grad(lambda z: losses.objective(z, labels, negatives_weight=0.5).sum())(
    logits
  )
  np.testing.assert_allclose(
    grad[2], 0.5 * (jax.nn.softmax(logits[2]) - 1 / 3), atol=1e-6
  )
  np.testing.assert_allclose(grad[1], 0.0, atol=1e-7)
  # Class weights come from the characters' images only.
  weights = losses.class_weights(np.array([0, 0, 1, -1, -1]), 2, "balanced")
  np.testing.assert_allclose(weights, [0.75, 1.5])


def test_each_score_on_constructed_outputs():
  bank = np.eye(4, dtype=np.float32)  # Four unit directions.
  features = np.asarray([[1, 0, 0, 0], [0.6, 0.8, 0, 0]], np.float32)
  # The 2nd nearest of [1, 0, 0, 0] is any other axis: sqrt(2) away.
  np.testing.assert_allclose(
    open_set.knn_score(features, bank, k=1), [0.0, -np.sqrt(2 - 2 * 0.8)], atol=1e-6
  )
  np.testing.assert_allclose(open_set.knn_score(features, bank, k=2)[0], -np.sqrt(2))
  rows = {
    "probabilities": np.asarray([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3]]),
    "max_logit": np.asarray([5.0, 1.0]),
    "logsumexp": np.asarray([6.0, 2.0]),
    "features": features,
  }
  found = open_set.scores(rows, 1.0, open_set.Bank(bank, neighbour=2))
  np.testing.assert_allclose(found["knn"], [-np.sqrt(2), -np.sqrt(0.8)], atol=1e-6)
  np.testing.assert_allclose(found["max_probability"], [0.7, 0.4])
  np.testing.assert_allclose(found["max_logit"], [5.0, 1.0])
  np.testing.assert_allclose(found["energy"], [6.0, 2.0])
  assert set(found) == set(open_set.SCORES)
  assert "knn" not in open_set.scores(rows, 1.0, None)


def test_a_bank_keeps_its_k_and_records_before_it_used_ten():
  bank = open_set.Bank(np.eye(12, 4, dtype=np.float32), neighbour=3)
  record = {"score": "knn", "threshold": -0.5, **open_set.encode_bank(bank)}
  decoded = open_set.decode_bank(open_set.checked(record, "here", "fix"))
  np.testing.assert_array_equal(decoded.features, bank.features)
  assert decoded.neighbour == 3
  del record["neighbour"]  # As a run trained before k was recorded.
  assert open_set.decode_bank(record).neighbour == 10
  assert open_set.decode_bank({"score": "energy", "threshold": 1.0}) is None
  for neighbour, why in ((0, "neighbour 0 is not in 1..12"), ("x", "feature bank")):
    with pytest.raises(files.DamagedFileError, match=why):
      open_set.checked(record | {"neighbour": neighbour}, "here", "fix")
  with pytest.raises(files.DamagedFileError, match="without its feature bank"):
    open_set.checked({"score": "knn", "threshold": -0.5}, "here", "fix")


def test_the_choice_keeps_the_best_score_and_a_95_percent_threshold():
  known = {"a": np.linspace(1, 2, 100), "b": np.linspace(0, 1, 100)}
  unknown = {"a": np.linspace(0, 1.05, 20), "b": np.linspace(0, 1, 20)}
  correct = np.ones(100, bool)
  # 20 negatives against 100 knowns: a share of 1/6 counts each once.
  chosen = open_set.choose(known, correct, unknown, unknown_share=1 / 6)
  assert chosen["score"] == "a" and chosen["auroc"]["a"] > chosen["auroc"]["b"]
  # Above the threshold at least 95% of the answered images are right ones.
  answered = (known["a"] >= chosen["threshold"]).sum()
  wrong = (unknown["a"] >= chosen["threshold"]).sum()
  assert answered / (answered + wrong) >= 0.95
  refused = (unknown["a"] < chosen["threshold"]).mean()
  assert chosen["negatives_refused"] == refused and refused >= 0.7
  assert chosen["answered"] == 1.0  # The lowest such threshold: every known.
  # Counted as half the images, each negative weighs 5: a stricter threshold,
  # the lowest at which the weighted precision holds.
  strict = open_set.choose(known, correct, unknown, unknown_share=0.5)
  assert strict["threshold"] > chosen["threshold"] and strict["unknown_share"] == 0.5
  answered = (known["a"] >= strict["threshold"]).sum()
  wrong = (unknown["a"] >= strict["threshold"]).sum()
  assert answered / (answered + 5 * wrong) >= 0.95
  below = unknown["a"][unknown["a"] < strict["threshold"]].max()
  assert (known["a"] >= below).sum() / (
    (known["a"] >= below).sum() + 5 * (wrong + 1)
  ) < 0.95
  without = open_set.choose(
    {"max_probability": np.full(10, 0.9)}, correct[:10], None, unknown_share=0.2
  )
  assert without["score"] == "max_probability"


def test_the_auroc_standard_error_is_the_spread_of_repeated_measurements():
  rng = np.random.default_rng(0)
  measured = [
    calibration.auroc(rng.normal(1.5, 1, 100), rng.normal(0, 1, 60))
    for _ in range(2000)
  ]
  error = open_set.auroc_standard_error(np.mean(measured), 100, 60)
  assert error == pytest.approx(np.std(measured), rel=0.1)
  assert open_set.auroc_standard_error(1.0, 100, 60) == 0.0


def test_the_knn_score_is_kept_unless_another_leads_by_more_than_noise():
  known = {"knn": np.linspace(0, 1, 200), "energy": np.linspace(0, 1, 200)}
  correct = np.ones(200, bool)

  def chosen(knn_lead: float, energy_lead: float) -> str:
    unknown = {
      "knn": np.linspace(-knn_lead, 1 - knn_lead, 200),
      "energy": np.linspace(-energy_lead, 1 - energy_lead, 200),
    }
    return open_set.choose(known, correct, unknown, unknown_share=0.2)["score"]

  # AUROC 0.83 against 0.82 (standard error about 0.02): knn stays.
  assert chosen(0.4, 0.42) == "knn"
  # 0.98 against 0.82: energy tells these negatives apart beyond doubt.
  assert chosen(0.4, 0.8) == "energy"
  assert chosen(0.4, 0.3) == "knn"  # Ahead anyway.


def test_prediction_sets_cover_as_asked_on_a_known_problem():
  """Probabilities that are the truth (labels drawn from them): the conformal
  sets hold the true label 90% of the time, and no more than needed."""
  rng = np.random.default_rng(0)

  def draw(n):
    p = rng.dirichlet(np.full(6, 0.5), size=n)
    labels = np.asarray([rng.choice(6, p=row) for row in p])
    return p, labels

  p, labels = draw(2000)
  threshold = open_set.set_threshold(open_set.conformity(p, labels), 0.9)
  test_p, test_labels = draw(20000)
  sets = open_set.prediction_sets(test_p, threshold)
  covered = np.mean([y in s for y, s in zip(test_labels, sets, strict=True)])
  assert 0.89 <= covered <= 0.92
  assert np.mean([len(s) for s in sets]) < 4
  # Too few images for the coverage asked: every character.
  assert open_set.set_threshold(np.asarray([0.5]), 0.9) == 1.0


def test_negatives_are_split_and_labelled_apart_before_training(
  tiny_data_dir, tmp_path
):
  config = make_tiny_config(tiny_data_dir)
  config.data.negatives = "clown,star_girl"
  config.data.negatives_val_share = 0.0  # Each negative splits by image.
  cmap, train_split, val_split = data.create(config).prepare(tmp_path)
  assert "clown" not in cmap.names and len(cmap.names) == 4
  assert (train_split.labels == -1).sum() == 32 and (val_split.labels == -1).sum() == 8
  saved = json.loads((tmp_path / "split.json").read_text())
  assert sum(k.startswith("clown/") for k in saved["val"]) == 4  # Frozen there.
  assert saved["val_characters"] == []
  assert len(data.create(config).validation(tmp_path, None)) == 16  # Knowns only.
  config.data.negatives = "nobody"
  with pytest.raises(characters.DatasetError, match="negatives='nobody' names"):
    data.create(config).prepare(tmp_path / "other")


def test_a_share_of_the_negative_characters_validates_whole(tiny_data_dir, tmp_path):
  """With negatives_val_share, one of two negative characters never trains:
  all its images validate, kept so in split.json; a new file of it is left
  out on resume, not trained."""
  root = Path(shutil.copytree(tiny_data_dir, tmp_path / "data"))
  config = make_tiny_config(root)
  config.data.negatives = "clown,star_girl"
  config.data.negatives_val_share = 0.5
  _, train_split, val_split = data.create(config).prepare(tmp_path / "run")
  saved = json.loads((tmp_path / "run" / "split.json").read_text())
  (whole,) = saved["val_characters"]
  (other,) = {"clown", "star_girl"} - {whole}
  assert sum(k.startswith(f"{whole}/") for k in saved["val"]) == 20
  assert not any(k.startswith(f"{whole}/") for k in saved["train"])
  assert sum(k.startswith(f"{other}/") for k in saved["val"]) == 4
  assert (train_split.labels == -1).sum() == 16 and (val_split.labels == -1).sum() == 24
  first = sorted((root / whole).iterdir())[0]
  (root / whole / "pic_new.jpg").write_bytes(first.read_bytes() + b"\0")
  config.data.negatives_val_share = 0.0  # The split is kept, not this.
  _, train_again, val_again = data.create(config).prepare(tmp_path / "run")
  assert (train_again.labels == -1).sum() == 16 and (val_again.labels == -1).sum() == 24
  for share, count in ((0.0, 0), (0.2, 1), (0.5, 2), (0.99, 3)):
    assert len(splits.validating_whole(("a", "b", "c", "d"), share, 0)) == count
  assert splits.validating_whole(("a",), 0.5, 0) == ()


def test_below_min_images_takes_the_small_folders(tmp_path):
  root = synthetic.generate(tmp_path / "d", images_per_character=6)
  for path in sorted((root / "clown").iterdir())[2:]:
    path.unlink()
  counts = {p.name: len(list(p.iterdir())) for p in root.iterdir()}
  assert characters.negatives("below_min_images", counts, 5) == ("clown",)
  assert characters.negatives("below_min_images", counts, 5, ("clown",)) == ()
  with pytest.raises(characters.DatasetError, match="both held out"):
    characters.negatives("clown", counts, 5, ("clown",))


@pytest.fixture
def knn_run(trained_workdir, tmp_path):
  """The shared run with its unknown score set to knn (as a run whose
  validation chose it would have it), a threshold at the median."""
  run = Path(shutil.copytree(trained_workdir, tmp_path / "run"))
  path = run / open_set.FILENAME
  records = json.loads(path.read_text())
  for record in records.values():
    record["score"] = "knn"
    record["threshold"] = -0.5
    record["neighbour"] = 3  # Not the default: every path must read it.
  path.write_text(json.dumps(records))
  return run


def test_predict_serve_and_an_export_give_one_unknown_score(
  knn_run, tiny_data_dir, tmp_path
):
  frames = sorted(tiny_data_dir.glob("*/*.jpg"))[::10]
  trained = trained_run.load(knn_run)
  rule = trained.rule("auto")
  assert (rule.score, rule.threshold) == ("knn", -0.5) and rule.bank is not None
  images = np.stack([predict._problem_or_image(p, 32, 10**8)[1] for p in frames])
  by_predict = trained_run.classifier(trained, 8, rule)(images)[1]
  by_serve = serve.Predictor(serve.load(knn_run), threshold="auto")
  answers = [by_serve(p.read_bytes()) for p in frames]
  written = export.run(knn_run, formats=("jax",), output_dir=tmp_path / "export")
  opened = export.open_folder(written.folder)
  by_export = opened.classify_with(opened.rule("auto"))(images)[1]
  np.testing.assert_allclose(by_export, by_predict, atol=1e-5)
  streamed = list(predict.classify_stream(trained, frames, threshold=rule))
  for answer, streamed_answer, score in zip(answers, streamed, by_predict, strict=True):
    expected = "unknown" if score < -0.5 else streamed_answer["top"][0]["character"]
    assert answer["character"] == streamed_answer["character"] == expected
    assert answer["unknown_score"] == "knn"


def test_the_unknown_set_is_never_read_to_choose(
  trained_workdir, tiny_data_dir, tmp_path, monkeypatch
):
  """evaluate --unknown_dir reports every score, but applies the run's own
  choice (made on its validation split): nothing is chosen on the unknowns."""
  before = (trained_workdir / open_set.FILENAME).read_text()
  others = tmp_path / "others"
  shutil.copytree(tiny_data_dir / "clown", others / "nelson_muntz")
  monkeypatch.setattr(open_set, "choose", lambda *a, **k: pytest.fail("chose again"))
  report = evaluate.run(
    trained_workdir,
    output_dir=tmp_path / "out",
    unknown_dir=str(others),
    coverage=0.9,
  )
  chosen = json.loads(before)[str(report["checkpoint_step"])]
  assert (trained_workdir / open_set.FILENAME).read_text() == before
  unknown = report["unknown"]
  assert (unknown["score"], unknown["threshold"]) == (
    chosen["score"],
    chosen["threshold"],
  )
  assert set(unknown["auroc"]) == set(unknown["fpr_at_95_tpr"]) == set(open_set.SCORES)
  assert 0 < report["sets"]["coverage"] <= 1 and report["sets"]["mean_size"] >= 1
  assert report["sets"]["threshold"] == open_set.coverage_threshold(chosen, 0.9)


@pytest.mark.slow
def test_a_run_with_negatives_chooses_its_score_on_them(tiny_data_dir, tmp_path):
  config = make_tiny_config(tiny_data_dir)
  config.data.negatives = "clown"
  train.train_and_evaluate(config, tmp_path / "run")
  records = open_set.load(tmp_path / "run")
  for record in records.values():
    assert record["validation"]["negatives"] == 4
    assert set(record["auroc"]) == set(open_set.SCORES)
    assert record["score"] in open_set.SCORES
  config.data.negatives = "star_girl"  # Another split: refused on resume.
  with pytest.raises(ValueError, match="data.negatives: 'clown' -> 'star_girl'"):
    train.train_and_evaluate(config, tmp_path / "run")
