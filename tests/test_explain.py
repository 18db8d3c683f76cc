"""Where it looked: on images whose character is decided by a patch at a known
place, Grad-CAM points at the patch for a trained model and not for the same
network with random weights (the sanity check of Adebayo et al. 2018)."""

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from simpsons_jax import explain, models, train
from simpsons_jax import trained as trained_run
from tests.conftest import make_tiny_config

SIZE, PATCH = 32, 10
# Each class's patch: the top-left corner of a quadrant.
CORNERS = {
  "north_west": (3, 3),
  "north_east": (3, 19),
  "south_west": (19, 3),
  "south_east": (19, 19),
}


def _image(rng, corner) -> np.ndarray:
  image = rng.integers(0, 90, (SIZE, SIZE, 3), np.uint8)
  y, x = corner
  image[y : y + PATCH, x : x + PATCH] = (250, 230, 40)
  return image


def _pointing_hits(cams: np.ndarray, corners: list) -> float:
  """The share of maps whose maximum lies in the quadrant of the image's
  patch (the network's last map is 2x2 at 32 px: a cell a quadrant)."""
  half = SIZE // 2
  hits = []
  for cam, (y, x) in zip(cams, corners, strict=True):
    top = np.unravel_index(cam.argmax(), cam.shape)
    hits.append((top[0] < half) == (y < half) and (top[1] < half) == (x < half))
  return float(np.mean(hits))


@pytest.mark.slow
def test_grad_cam_points_at_the_deciding_patch_and_random_weights_do_not(tmp_path):
  # One run's map is seed luck (its last map is 2x2, a cell a quadrant: chance
  # is 0.25); the median of five seeds' runs is not.
  rng = np.random.default_rng(0)
  for name, corner in CORNERS.items():
    (tmp_path / "data" / name).mkdir(parents=True)
    for i in range(30):
      Image.fromarray(_image(rng, corner)).save(tmp_path / "data" / name / f"{i}.png")
  trained_hits, random_hits = [], []
  for seed in range(5):
    config = make_tiny_config(tmp_path / "data")
    config.train.num_epochs = 8
    config.seed = seed
    train.train_and_evaluate(config, tmp_path / f"run{seed}")
    trained = trained_run.load(tmp_path / f"run{seed}", "latest")
    model = models.create(trained.config, trained.cmap.num_classes, kernels="xla")
    names = trained.cmap.names
    test_rng = np.random.default_rng(1)
    labels = np.arange(40) % len(names)
    images = np.stack([_image(test_rng, CORNERS[names[c]]) for c in labels])
    corners = [CORNERS[names[c]] for c in labels]

    found = explain.maps(model.apply, trained.variables, images, labels)
    assert (found["targets"] == labels).all()
    assert found["grad_cam"].shape == found["input_gradient"].shape == (40, SIZE, SIZE)
    answers = np.asarray(model.apply(trained.variables, images, train=False))
    assert (answers.argmax(-1) == labels).mean() >= 0.9  # It learned the patch.
    trained_hits.append(_pointing_hits(found["grad_cam"], corners))

    random = model.init(jax.random.PRNGKey(7 + seed), images, train=False)
    found_random = explain.maps(model.apply, random, images, labels)
    random_hits.append(_pointing_hits(found_random["grad_cam"], corners))
    # The maps change when the weights do (Adebayo et al.'s model randomisation).
    assert not np.allclose(found_random["grad_cam"], found["grad_cam"], atol=0.1)
  assert np.median(trained_hits) >= 0.7, trained_hits
  assert np.median(random_hits) <= 0.5, random_hits


def test_predict_explain_draws_each_image_and_names_the_drawing(
  trained_workdir, tiny_data_dir, tmp_path
):
  from simpsons_jax import predict

  images = sorted(tiny_data_dir.glob("*/*.jpg"))[:3]
  results = predict.run(
    trained_workdir,
    [*map(str, images), str(tmp_path / "missing.jpg")],
    output_dir=str(tmp_path / "out"),
    explain_images=True,
  )
  drawn = [r["explanation"] for r in results if "explanation" in r]
  assert len(drawn) == 3 and "error" in results[-1]
  for path in drawn:
    assert Image.open(path).size[0] > 300  # A figure of three panels.


@pytest.mark.slow
@pytest.mark.parametrize(
  "name, size, dtype",
  [
    *((name, "min", "float32") for name in models.MODELS),
    *((name, 64, "float32") for name in models.MODELS),
    ("simpsons_cnn", 64, "bfloat16"),
  ],
)
def test_every_model_at_any_size_and_dtype_gives_maps_of_its_images(name, size, dtype):
  config = default.get_config()
  config.model.name = name
  config.train.dtype = dtype
  size = models.min_image_size(config) if size == "min" else size
  images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), np.uint8)
  model = models.create(config, 5, kernels="xla")
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  found = explain.explainer(config, 5, variables)(images)
  for kind in ("grad_cam", "input_gradient"):
    assert found[kind].shape == (3, size, size)
    assert np.isfinite(found[kind]).all()
    assert found[kind].min() >= 0 and found[kind].max() <= 1
  answers = np.asarray(model.apply(variables, images, train=False)).argmax(-1)
  np.testing.assert_array_equal(found["targets"], answers)
  # Exported for any batch size (explain.jax), the same maps.
  (b,) = jax.export.symbolic_shape("b")
  exported = jax.export.export(
    jax.jit(lambda x, t: explain.maps(model.apply, variables, x, t)["grad_cam"])
  )(
    jax.ShapeDtypeStruct((b, size, size, 3), np.uint8),
    jax.ShapeDtypeStruct((b,), np.int32),
  )
  np.testing.assert_allclose(
    exported.call(images, answers.astype(np.int32)), found["grad_cam"], atol=1e-5
  )
