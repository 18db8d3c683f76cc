"""oneDNN's convolutions (cpu_conv) against lax's, and the written-out pool backward."""

import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import full, strong
from simpsons_jax import convolutions, cpu_conv, models, sharding

X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"
NHWC = ("NHWC", "HWIO", "NHWC")


def test_the_kernels_load_on_x86_linux():
  # CI runs here: the real kernels, not the fallback, must be what it tests.
  if not X86_LINUX:
    pytest.skip("oneDNN kernels are built for x86-64 Linux only")
  loaded, detail = cpu_conv.available()
  assert loaded, detail
  assert detail.startswith("oneDNN 3.")


def _needs_kernels():
  if not cpu_conv.available()[0]:
    pytest.skip(cpu_conv.available()[1])


@pytest.mark.parametrize(
  "shape, kernel, strides, padding, features",
  [
    ((1, 7, 5, 3), (3, 3), (1, 1), "SAME", 6),  # batch 1, odd sizes, 3 channels
    ((3, 9, 8, 5), (3, 3), (2, 2), "SAME", 6),  # stride 2, odd height (ResNet)
    ((2, 8, 8, 4), (1, 1), (2, 2), "VALID", 6),  # the ResNet's 1x1 shortcut
    ((5, 11, 13, 3), (3, 3), (1, 1), ((1, 0), (2, 1)), 6),  # asymmetric padding
    ((4, 16, 16, 8), (3, 3), (1, 1), "SAME", 6),
    # <= 4 channels, outputs in 8s: the direct convolution (the ResNet's stem).
    ((2, 28, 28, 3), (3, 3), (1, 1), "SAME", 32),
    ((3, 11, 13, 1), (3, 3), (1, 1), ((1, 0), (2, 1)), 8),
    ((2, 9, 7, 2), (5, 5), (1, 1), "VALID", 16),
  ],
)
def test_forward_and_gradients_equal_lax(shape, kernel, strides, padding, features):
  _needs_kernels()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  k = jnp.asarray(rng.standard_normal((*kernel, shape[-1], features), np.float32))

  def run(conv):
    def f(x, k):
      return conv(x, k, strides, padding, dimension_numbers=NHWC)

    y = jax.jit(f)(x, k)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape, np.float32))
    grads = jax.jit(jax.grad(lambda x, k: (f(x, k) * g).sum(), argnums=(0, 1)))(x, k)
    return y, *grads

  plain = run(lax.conv_general_dilated)
  ours = run(cpu_conv.conv_general_dilated)
  for a, b in zip(plain, ours, strict=True):
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


DENSE = (((1,), (0,)), ((), ()))


@pytest.mark.parametrize("bfloat16", [False, True])
@pytest.mark.parametrize(
  "m, k, n", [(1, 1, 1), (3, 5, 7), (17, 70, 40), (64, 4096, 512)]
)
def test_dense_products_and_gradients_equal_lax(m, k, n, bfloat16):
  # With bfloat16, lax's float32 product of the rounded operands (and, for
  # the gradients, of the rounded output gradient): float32 accumulation.
  _needs_kernels()
  if bfloat16 and not cpu_conv.bfloat16()[0]:
    pytest.skip(cpu_conv.bfloat16()[1])
  rng = np.random.default_rng(m + k + n)
  x, w, g = (
    jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((m, k), (k, n), (m, n))
  )

  def run(dot, x, w, g):
    y, vjp = jax.vjp(lambda x, w: dot(x, w, DENSE), x, w)
    return y, *vjp(g)

  def operand(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32) if bfloat16 else a

  highest = functools.partial(lax.dot_general, precision=lax.Precision.HIGHEST)
  plain = jax.jit(functools.partial(run, highest))(*map(operand, (x, w, g)))
  ours = jax.jit(
    functools.partial(run, functools.partial(cpu_conv.dot_general, bfloat16=bfloat16))
  )(x, w, g)

  def loss(x, w):
    return cpu_conv.dot_general(x, w, DENSE, bfloat16=bfloat16).sum()

  hlo = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, w).as_text()
  assert hlo.count("OnednnMatmul" + ("Bf16" if bfloat16 else "")) == 3
  assert "dot_general" not in hlo and "dot(" not in hlo
  for a, b in zip(plain, ours, strict=True):
    assert a.shape == b.shape and b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


def test_the_kernels_run_in_the_compiled_step():
  _needs_kernels()
  x = jnp.zeros((2, 8, 8, 3))
  k = jnp.zeros((3, 3, 3, 4))
  hlo = (
    jax.jit(
      jax.grad(
        lambda k: (
          cpu_conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)
          ** 2
        ).sum()
      )
    )
    .lower(k)
    .as_text()
  )
  assert "OnednnConvForward" in hlo
  assert "OnednnConvBackwardWeights" in hlo
  assert "convolution" not in hlo


def test_what_onednn_does_not_handle_goes_to_lax_unchanged():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 4), np.float32))
  k = jnp.asarray(rng.standard_normal((3, 3, 4, 4), np.float32))
  cases = [
    dict(rhs_dilation=(2, 2)),
    dict(feature_group_count=2, k=k[:, :, :2]),
    dict(dtype=jnp.bfloat16),
  ]
  for case in cases:
    kk = case.pop("k", k)
    dtype = case.pop("dtype", jnp.float32)
    args = (x.astype(dtype), kk.astype(dtype), (1, 1), "SAME")
    expected = lax.conv_general_dilated(*args, dimension_numbers=NHWC, **case)
    got = cpu_conv.conv_general_dilated(*args, dimension_numbers=NHWC, **case)
    np.testing.assert_array_equal(got, expected)
  # Products other than a float32 (M, K) by (K, N): lax's.
  a = jnp.asarray(rng.standard_normal((2, 3, 4), np.float32))
  b = jnp.asarray(rng.standard_normal((2, 4, 5), np.float32))
  products = [
    (a, b, (((2,), (1,)), ((0,), (0,)))),  # batched
    (a[0], b[0].T, (((1,), (1,)), ((), ()))),  # contracting the kernel's last axis
    (a[0].astype(jnp.bfloat16), b[0].astype(jnp.bfloat16), DENSE),
    (a, b[0], (((2,), (0,)), ((), ()))),  # three axes
  ]
  for lhs, rhs, dimensions in products:
    hlo = jax.jit(functools.partial(cpu_conv.dot_general, dimension_numbers=dimensions))
    assert "Onednn" not in hlo.lower(lhs, rhs).as_text()
    np.testing.assert_array_equal(
      cpu_conv.dot_general(lhs, rhs, dimensions), lax.dot_general(lhs, rhs, dimensions)
    )


def test_sharded_over_eight_devices_equals_one_device():
  # Eight devices run each primitive from eight threads at once: each
  # execution needs its own scratchpad (a shared one failed 1 run in 6).
  _needs_kernels()
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.standard_normal((3, 3, 3, 8), np.float32))

  def grads(x, k):
    return jax.grad(
      lambda x, k: (
        cpu_conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC) ** 2
      ).sum(),
      argnums=(0, 1),
    )(x, k)

  mesh = sharding.make_mesh()
  for _ in range(5):
    x = rng.standard_normal((16, 12, 12, 3)).astype(np.float32)
    sharded = jax.jit(grads)(jax.device_put(x, sharding.data_sharding(mesh)), k)
    single = jax.jit(grads)(jnp.asarray(x), k)
    for a, b in zip(single, sharded, strict=True):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("get_config", [full.get_config, strong.get_config])
def test_the_same_parameters_and_function_on_both_paths(get_config):
  _needs_kernels()
  config = get_config()
  config.data.image_size = 32
  config.train.cpu_kernels = "xla"
  images = jnp.asarray(
    np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  )
  plain = models.create(config, num_classes=13)
  if config.model.name == "resnet":
    ours = plain.clone(conv_fn=cpu_conv.conv_general_dilated, onednn=True)
  else:
    ours = plain.clone(onednn=True)
  variables = plain.init(jax.random.PRNGKey(0), images, train=False)
  assert jax.tree.map(
    jnp.shape, ours.init(jax.random.PRNGKey(0), images, train=False)
  ) == (jax.tree.map(jnp.shape, variables))
  np.testing.assert_allclose(
    ours.apply(variables, images, train=False),
    plain.apply(variables, images, train=False),
    rtol=1e-4,
    atol=1e-4,
  )

  def train_loss(model, params):  # Batch statistics, and the gradient through them.
    logits, _ = model.apply(
      {**variables, "params": params},
      images,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.PRNGKey(1)},  # The same dropout on both.
    )
    return (logits * jnp.arange(13.0)).sum()

  expected = jax.grad(functools.partial(train_loss, plain))(variables["params"])
  got = jax.grad(functools.partial(train_loss, ours))(variables["params"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      b, a, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max())
    ),
    expected,
    got,
  )


def test_the_notebook_network_keeps_its_parameter_count_with_onednn():
  config = full.get_config()
  config.train.cpu_kernels = "onednn"
  model = models.create(config, num_classes=13)
  variables = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3), jnp.uint8), train=False
    )
  )
  assert models.count_params(variables["params"]) == 2_916_829


def test_the_log_line_names_the_kernels():
  config = full.get_config()
  config.train.cpu_kernels = "xla"
  assert convolutions.implementation(config) == (
    "xla",
    "XLA:CPU's (--config.train.cpu_kernels=xla)",
  )
  config.train.cpu_kernels = "onednn"
  # The tests simulate 8 CPU devices: oneDNN's kernels are for one.
  assert convolutions.implementation(config) == (
    "xla",
    "XLA:CPU's (oneDNN's run on one CPU device, not 8)",
  )


ONE_DEVICE_RUN = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from configs import default
from simpsons_jax import characters, convolutions, sharding, synthetic, train

root, out = sys.argv[1], sys.argv[2]
config = default.get_config()
config.data.dir = str(synthetic.generate(root + "/data", images_per_character=20))
config.data.min_images, config.data.image_size, config.data.val_fraction = 1, 32, 0.2
config.model.simpsons_cnn.dense_features = (64, 64)
config.train.batch_size, config.train.log_every_steps = 16, 2
leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves(jax.device_get(s.params))]
config.train.num_epochs = 2
whole, metrics = train.train_and_evaluate(config, root + "/a")
config.train.num_epochs = 1
train.train_and_evaluate(config, root + "/b")
config.train.num_epochs = 2
resumed, _ = train.train_and_evaluate(config, root + "/b")

# The step as compiled (scheduled for memory) and as XLA schedules by default.
num_classes = len(characters.CharacterMap.load(root + "/a/characters.json").names)
mesh = sharding.make_mesh(jax.devices())
rng = np.random.default_rng(0)
batch = sharding.shard_batch({
  "image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
  "label": rng.integers(0, num_classes, 16, dtype=np.int32),
  "mask": np.ones(16, np.float32),
}, mesh)
options = train._compiler_options(config)
by_memory = train.jit_train_step(mesh, config)
train._compiler_options = lambda config: None
by_default = train.jit_train_step(mesh, config)
stepped = [f(jax.tree.map(jnp.copy, whole), batch) for f in (by_memory, by_default)]
json.dump({
  "devices": jax.device_count(),
  "convolutions": convolutions.implementation(config)[1],
  "bitwise_equal": all(
    np.array_equal(a, b) for a, b in zip(leaves(whole), leaves(resumed))
  ),
  "loss": float(metrics["loss"]),
  "options": options,
  "schedules_equal": all(
    np.array_equal(a, b) for a, b in zip(*(jax.tree.leaves(s) for s in stepped))
  ),
}, open(out, "w"))
"""


@pytest.mark.slow
def test_one_device_trains_through_onednn_and_resumes_bitwise(tmp_path):
  _needs_kernels()
  env = {**os.environ, "XLA_FLAGS": "", "OMP_NUM_THREADS": "2"}
  out = tmp_path / "result.json"
  subprocess.run(
    [sys.executable, "-c", ONE_DEVICE_RUN, str(tmp_path), str(out)],
    cwd=Path(__file__).resolve().parents[1],
    env=env,
    check=True,
    capture_output=True,
  )
  result = json.loads(out.read_text())
  assert result["devices"] == 1
  assert result["convolutions"].startswith("oneDNN 3.")
  assert result["bitwise_equal"]
  assert np.isfinite(result["loss"])
  # The step is scheduled for memory with oneDNN, and computes the same bits.
  assert result["options"] == {"xla_cpu_enable_concurrency_optimized_scheduler": False}
  assert result["schedules_equal"]


def _relu_pool(x):
  return models.max_pool_2x2(nn.relu(x))


def test_a_tied_window_splits_its_gradient_evenly():
  x = jnp.array([[1.0, 1.0], [0.0, -1.0]]).reshape(1, 2, 2, 1)
  grad = jax.grad(lambda x: _relu_pool(x).sum())(x)
  np.testing.assert_array_equal(grad.reshape(2, 2), [[0.5, 0.5], [0.0, 0.0]])


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 5), (1, 2, 2, 16)])
def test_the_fused_pool_equals_the_jax_pool_with_ties(shape):
  # A 1x1 identity kernel and no bias: the convolution passes x through
  # exactly, so the fused block's pool meets x's ties as they are.
  _needs_kernels()
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.round(rng.standard_normal(shape) * 1.5).astype(np.float32))
  identity = jnp.eye(shape[-1], dtype=jnp.float32)[None, None]
  zero = jnp.zeros(shape[-1], jnp.float32)
  pooled_shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  g = jnp.asarray(rng.standard_normal(pooled_shape).astype(np.float32))
  expected_y, expected_vjp = jax.vjp(_relu_pool, x)
  for fused in (
    lambda x: cpu_conv.conv_relu_pool(x, identity, zero),
    cpu_conv.relu_max_pool,  # The pool alone (the ResNet's stem).
  ):
    y, vjp = jax.vjp(fused, x)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(vjp(g)[0], expected_vjp(g)[0])


@pytest.mark.parametrize(
  "shape, kernel, padding",
  [
    # Up to 4 input channels: the direct convolution. 129 rows: the last is dropped.
    ((10, 129, 128, 3), (3, 3, 3, 8), "SAME"),
    ((3, 13, 21, 1), (3, 3, 1, 16), ((1, 0), (2, 1))),  # odd, asymmetric padding
    ((2, 9, 11, 4), (5, 5, 4, 8), "SAME"),  # not 3x3: the pixel-at-a-time path
    ((2, 6, 6, 2), (3, 3, 2, 8), "VALID"),
    # More channels: oneDNN, whose 4 MB chunks hold 15 of these images, then 5.
    ((20, 65, 64, 8), (3, 3, 8, 16), "SAME"),
  ],
)
def test_fused_block_equals_conv_bias_relu_pool(shape, kernel, padding):
  _needs_kernels()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  k = jnp.asarray(rng.standard_normal(kernel, np.float32))
  b = jnp.asarray(rng.standard_normal(kernel[-1:], np.float32))

  def plain(x, k, b):
    y = lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=NHWC) + b
    return _relu_pool(y)

  g = jnp.asarray(rng.standard_normal(jax.eval_shape(plain, x, k, b).shape, np.float32))

  def run(f):
    loss = lambda x, k, b: (f(x, k, b) * g).sum()  # noqa: E731
    return jax.jit(f)(x, k, b), *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, k, b)

  for a, c in zip(
    run(plain),
    run(lambda x, k, b: cpu_conv.conv_relu_pool(x, k, b, padding=padding)),
    strict=True,
  ):
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


@pytest.mark.parametrize(
  "shape, kernel, padding",
  [
    # The first block: divided inside the kernel, forward and backward.
    ((6, 33, 32, 3), (3, 3, 3, 8), "SAME"),
    ((3, 13, 21, 2), (3, 3, 2, 16), ((1, 0), (2, 1))),  # odd, asymmetric
    ((2, 7, 77, 3), (3, 3, 3, 8), "SAME"),  # Two runs of 32 pixels and a tail.
    ((2, 10, 12, 8), (3, 3, 8, 16), "SAME"),  # 8 channels: XLA converts, then oneDNN
  ],
)
def test_uint8_images_equal_their_float_values(shape, kernel, padding):
  _needs_kernels()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8))
  k = jnp.asarray(rng.standard_normal(kernel, np.float32))
  b = jnp.asarray(rng.standard_normal(kernel[-1:], np.float32))

  def plain(k, b):
    y = x.astype(jnp.float32) / 255.0
    y = lax.conv_general_dilated(y, k, (1, 1), padding, dimension_numbers=NHWC) + b
    return _relu_pool(y)

  def fused(k, b):
    return cpu_conv.conv_relu_pool(x, k, b, padding=padding, divisor=255.0)

  g = jnp.asarray(rng.standard_normal(jax.eval_shape(plain, k, b).shape, np.float32))

  def value_and_grads(f):
    y, vjp = jax.vjp(jax.jit(f), k, b)
    return (y, *vjp(g))

  for a, c in zip(value_and_grads(plain), value_and_grads(fused), strict=True):
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))
  lowered = jax.jit(jax.grad(lambda k, b: fused(k, b).sum())).lower(k, b).as_text()
  assert ("ConvBiasReluPoolForwardU8" in lowered) == (shape[-1] <= 4)
  assert ("ConvBiasReluPoolBackwardU8" in lowered) == (shape[-1] <= 4)


def test_kernels_that_fail_their_self_check_are_refused_once(monkeypatch, caplog):
  # A CPU or oneDNN build computing wrong values: XLA's convolutions run.
  _needs_kernels()
  monkeypatch.setattr(
    cpu_conv.self_check,
    "failures",
    lambda *args, **kwargs: ["conv (2, 8, 8, 4): kernel gradient"],
  )
  cpu_conv.available.cache_clear()
  try:
    with caplog.at_level("WARNING"):
      loaded, why = cpu_conv.available()
      cpu_conv.available()
    assert not loaded
    assert "wrong results" in why and "kernel gradient" in why
    assert sum("Not using oneDNN" in r.getMessage() for r in caplog.records) == 1
    config = full.get_config()
    config.train.cpu_kernels = "onednn"
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert convolutions.implementation(config) == (
      "xla",
      f"XLA:CPU's (oneDNN kernels unavailable: {why})",
    )
    x, k = jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
    hlo = (
      jax.jit(
        lambda x: cpu_conv.conv_general_dilated(
          x, k, (1, 1), "SAME", dimension_numbers=NHWC
        )
      )
      .lower(x)
      .as_text()
    )
    assert "Onednn" not in hlo and "convolution" in hlo
    with pytest.raises(RuntimeError, match="not used here"):
      cpu_conv.relu_max_pool(x)
  finally:
    cpu_conv.available.cache_clear()


@pytest.mark.parametrize(
  "get_config, kernels",
  [
    (full.get_config, ("ConvBiasReluPoolForwardBf16", "OnednnMatmulBf16")),
    (strong.get_config, ("OnednnConvBackwardDataBf16",)),
  ],
)
def test_bfloat16_networks_are_as_close_to_float32_as_xlas_bfloat16(
  get_config, kernels
):
  # The same parameters in float32, with oneDNN's bfloat16 convolutions (in
  # the compiled step) and all in bfloat16 through XLA: ours is at least as
  # near float32 as XLA's bfloat16 is (its rounding, not a fault of ours).
  if not cpu_conv.bfloat16()[0]:
    pytest.skip(cpu_conv.bfloat16()[1])
  config = get_config()
  config.data.image_size = 32
  images = jnp.asarray(
    np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  )
  f32 = models.create(config, num_classes=13, kernels="onednn")
  config.train.dtype = "bfloat16"
  ours = models.create(config, num_classes=13, kernels="onednn")
  xla = models.create(config, num_classes=13, kernels="xla").clone(dtype=jnp.bfloat16)
  assert f32.dtype == ours.dtype == jnp.float32  # The convolutions alone round.
  variables = f32.init(jax.random.PRNGKey(0), images, train=False)

  def loss(model, params):
    logits, _ = model.apply(
      {**variables, "params": params},
      images,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.PRNGKey(1)},
    )
    return (logits * jnp.arange(13.0)).sum(), logits

  def gradient(model):
    step = jax.jit(jax.grad(functools.partial(loss, model), has_aux=True))
    grads, logits = step(variables["params"])
    flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
    return step.lower(variables["params"]).as_text(), flat, logits

  _, want, want_logits = gradient(f32)
  lowered, got, got_logits = gradient(ours)
  _, xla_got, xla_logits = gradient(xla)
  assert all(kernel in lowered for kernel in kernels)
  assert got.dtype == got_logits.dtype == jnp.float32

  def error(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  assert error(got, want) < 0.25  # bfloat16 keeps 8 bits.
  assert error(got, want) < 1.25 * error(xla_got, want)
  assert error(got_logits, want_logits) < 1.25 * error(xla_logits, want_logits) + 1e-3


def test_bfloat16_runs_in_float32_where_it_would_be_slower(monkeypatch, caplog):
  # XLA:CPU's convolutions, or a CPU without bfloat16 dot products: float32,
  # and the run's log says why, once. With them, the convolutions alone round.
  config = full.get_config()
  config.train.dtype = "bfloat16"
  monkeypatch.setattr(cpu_conv, "bfloat16", lambda: (True, "bfloat16 on CPU X"))
  assert convolutions.precision(config, "onednn") == (jnp.float32, True, "")
  monkeypatch.setattr(
    cpu_conv, "bfloat16", lambda: (False, "CPU X has no bfloat16 dot products")
  )
  assert convolutions.precision(config, "onednn") == (
    jnp.float32,
    False,
    "--config.train.dtype=bfloat16 runs in float32 on this CPU: CPU X has no "
    "bfloat16 dot products.",
  )
  assert convolutions.precision(config, "xla")[2] == (
    "--config.train.dtype=bfloat16 runs in float32 on this CPU: bfloat16 needs "
    "oneDNN's convolutions here."
  )
  config.train.dtype = "float32"
  assert convolutions.precision(config, "onednn") == (jnp.float32, False, "")
  # Said by the model the run builds, not by those built for shapes or exports.
  config.train.dtype = "bfloat16"
  config.train.cpu_kernels = "xla"
  convolutions.set_up.cache_clear()
  with caplog.at_level("INFO"):
    models.create(config, num_classes=13, kernels="xla")
    assert not [r for r in caplog.records if "runs in float32" in r.getMessage()]
    models.create(config, num_classes=13)
    models.create(config, num_classes=13)
  lines = [
    r.getMessage() for r in caplog.records if "runs in float32" in r.getMessage()
  ]
  assert lines == [
    "--config.train.dtype=bfloat16 runs in float32 on this CPU: bfloat16 needs "
    "oneDNN's convolutions here."
  ]
