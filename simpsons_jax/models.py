"""The networks that name a character from an image."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from simpsons_jax import cpu_conv, errors, host_memory

# XLA:CPU's kernel-gradient convolution slows down sharply once the batch's
# pixels outgrow the cache (docs/performance.md). Each chunk holds about this
# many input pixels; the chunk count is capped to bound the unrolled graph
# (and compile time).
KERNEL_GRAD_PIXELS = 8 * 14 * 14
MAX_KERNEL_GRAD_CHUNKS = 16


def chunked_kernel_grad_conv(lhs: jax.Array, rhs: jax.Array, *args, **kwargs):
  """`lax.conv_general_dilated` whose kernel gradient is summed over chunks of
  the batch (axis 0), for XLA:CPU. Same values as the plain convolution up to
  float summation order.

  With G chunks, chunk k holds rows k, k + G, k + 2G, ... so that a batch
  sharded over devices splits evenly: every device holds part of every chunk.
  """

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, *args, **kwargs)

  @jax.custom_vjp
  def f(x, kernel):
    return conv(x, kernel)

  def forward(x, kernel):
    return conv(x, kernel), (x, kernel)

  def backward(residuals, g):
    x, kernel = residuals
    (dx,) = jax.vjp(lambda x: conv(x, kernel), x)[1](g)
    n = x.shape[0]
    if not isinstance(n, int):  # A symbolic batch (jax.export): one chunk.
      return dx, jax.vjp(functools.partial(conv, x), kernel)[1](g)[0]
    rows = max(1, KERNEL_GRAD_PIXELS // (x.shape[1] * x.shape[2]))
    chunks = max(1, min(n // rows, MAX_KERNEL_GRAD_CHUNKS))
    while n % chunks:
      chunks -= 1
    xs = x.reshape(n // chunks, chunks, *x.shape[1:])
    gs = g.reshape(n // chunks, chunks, *g.shape[1:])
    dkernel = sum(
      jax.vjp(functools.partial(conv, xs[:, i]), kernel)[1](gs[:, i])[0]
      for i in range(chunks)
    )
    return dx, dkernel

  f.defvjp(forward, backward)
  return f(lhs, rhs)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 ('VALID'), as `nn.max_pool` computes it.

  Written as a reshape and a max: the same values as `nn.max_pool`, but XLA's
  CPU backward pass for it is much faster than the one for `reduce_window`.
  Its gradient goes to each window's maximum, split evenly between ties
  (`cpu_conv`'s fused block computes the same).
  """
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ConvReluPool(nn.Conv):
  """`nn.Conv`, then ReLU and a 2x2 max pool: one block of the notebook network.

  Its parameters are `nn.Conv`'s (same names, shapes and initialisers). With
  `onednn`, a float32 block runs as `cpu_conv.conv_relu_pool` (bias, ReLU and
  pool fused around oneDNN's convolution, or a direct one on uint8 images);
  otherwise as `nn.Conv`, `nn.relu` and `max_pool_2x2`. Both compute the same
  function and gradients.
  """

  onednn: bool = False
  # Set for the first block: its inputs are pixel values (uint8 images, or
  # float after mixing), used as `inputs.astype(dtype) / input_divisor`.
  input_divisor: float | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    fused = self.onednn and jnp.dtype(self.dtype) == jnp.float32
    # uint8 images go to the fused kernel as they are: it divides them itself.
    if self.input_divisor and not (fused and inputs.dtype == jnp.uint8):
      inputs = inputs.astype(self.dtype) / self.input_divisor
    if not (fused and inputs.dtype in (jnp.float32, jnp.uint8)):
      return max_pool_2x2(nn.relu(super().__call__(inputs)))
    kernel_shape = (*self.kernel_size, inputs.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    strides = self.strides or 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    return cpu_conv.conv_relu_pool(
      inputs, kernel, bias, strides, self.padding, self.input_divisor or 1.0
    )


class SimpsonsCNN(nn.Module):
  """The notebook's network: conv+ReLU+pool blocks, then dropout+dense layers.

  Inputs are uint8 images (N, H, W, 3); outputs one float32 logit per
  character. `dtype` is the compute type (bfloat16 on accelerators); the
  parameters stay float32.
  """

  num_classes: int
  conv_features: Sequence[int] = (8, 16, 32, 64)
  dense_features: Sequence[int] = (512, 512, 512, 512)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  onednn: bool = False  # Conv blocks through cpu_conv.conv_relu_pool.

  # The settings that fix its parameters (a resumed run may not change them).
  FIXED_SETTINGS = ("conv_features", "dense_features")

  @staticmethod
  def min_image_size(settings: Mapping[str, Any]) -> int:
    """Each conv block halves the image: at least one pixel must be left."""
    return 2 ** len(settings["conv_features"])

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    glorot = nn.initializers.glorot_uniform()
    x = images  # The first block divides them by 255.
    for i, features in enumerate(self.conv_features):
      x = ConvReluPool(
        features,
        (3, 3),
        padding="SAME",
        kernel_init=glorot,
        dtype=self.dtype,
        onednn=self.onednn,
        input_divisor=255.0 if i == 0 else None,
        name=f"conv{i}",
      )(x)
    x = x.reshape(x.shape[0], -1)
    for i, features in enumerate(self.dense_features):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      dense = nn.Dense(features, kernel_init=glorot, dtype=self.dtype, name=f"dense{i}")
      x = nn.relu(dense(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(
      self.num_classes, kernel_init=glorot, dtype=self.dtype, name="logits"
    )(x)
    return logits.astype(jnp.float32)


def _conv(dtype: Any, conv_fn: Callable | None) -> Callable[..., nn.Conv]:
  """Bias-free convolutions, as every convolution of the ResNet is."""
  return functools.partial(
    nn.Conv, use_bias=False, dtype=dtype, conv_general_dilated=conv_fn
  )


def _norm(dtype: Any, train: bool) -> Callable[..., nn.BatchNorm]:
  """BatchNorm on batch statistics in training, running averages otherwise."""
  return functools.partial(
    nn.BatchNorm, use_running_average=not train, momentum=0.9, dtype=dtype
  )


class ResidualBlock(nn.Module):
  """Two 3x3 conv+BatchNorm layers and a shortcut (a 1x1 conv where shapes change).

  The last BatchNorm starts at zero scale, so each block starts as the identity.
  """

  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_fn: Callable | None = None  # Replaces lax.conv_general_dilated.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv, norm = _conv(self.dtype, self.conv_fn), _norm(self.dtype, train)
    shortcut = x
    y = conv(self.features, (3, 3), self.strides, padding="SAME")(x)
    y = nn.relu(norm()(y))
    y = conv(self.features, (3, 3), padding="SAME")(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if shortcut.shape != y.shape:
      shortcut = conv(self.features, (1, 1), self.strides)(shortcut)
      shortcut = norm()(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """A small ResNet: a 3x3 stem, stages of residual blocks, global average pool.

  Each stage after the first halves the resolution. `stem_pool` adds a 2x2
  max pool after the stem (cheaper early stages on larger images). BatchNorm
  statistics live in the `batch_stats` collection; under `jax.jit` on a
  sharded batch they are computed over the global batch, on every device.
  `conv_fn` replaces `lax.conv_general_dilated` in every convolution (see
  `conv_implementation`); with `onednn`, the stem's ReLU + pool is
  `cpu_conv.relu_max_pool` (the same function and gradients).
  """

  num_classes: int
  stem_features: int = 32
  stem_pool: bool = False
  stage_features: Sequence[int] = (32, 64, 128)
  blocks_per_stage: int = 1
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv_fn: Callable | None = None
  onednn: bool = False

  FIXED_SETTINGS = ("stem_features", "stem_pool", "stage_features", "blocks_per_stage")

  @staticmethod
  def min_image_size(settings: Mapping[str, Any]) -> int:
    """The stem pool and each stage after the first halve the image."""
    return 2 ** (len(settings["stage_features"]) - 1 + int(settings["stem_pool"]))

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    conv_fn = self.conv_fn
    x = images.astype(self.dtype) / 127.5 - 1.0
    x = _conv(self.dtype, conv_fn)(self.stem_features, (3, 3), padding="SAME")(x)
    x = _norm(self.dtype, train)()(x)
    if self.stem_pool and self.onednn and x.dtype == jnp.float32:
      x = cpu_conv.relu_max_pool(x)
    elif self.stem_pool:
      x = max_pool_2x2(nn.relu(x))
    else:
      x = nn.relu(x)
    for i, features in enumerate(self.stage_features):
      for j in range(self.blocks_per_stage):
        strides = 2 if i > 0 and j == 0 else 1
        x = ResidualBlock(features, strides, self.dtype, conv_fn)(x, train=train)
    x = x.mean(axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
    return logits.astype(jnp.float32)


def conv_implementation(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """Which convolutions the models use here ('onednn' or 'xla'), and a line
  saying so for the log.

  On one x86 CPU device, oneDNN's kernels (`cpu_conv`) unless
  `config.train.cpu_kernels` is 'xla' or they did not load; elsewhere XLA's own (on
  several simulated CPU devices XLA would run each custom call whole on every
  device). Either computes the same function of the same parameters.
  """
  if jax.default_backend() != "cpu":
    return "xla", f"XLA's ({jax.default_backend()})"
  if config.train.cpu_kernels == "xla":
    return "xla", "XLA:CPU's (--config.train.cpu_kernels=xla)"
  if jax.device_count() > 1:
    return (
      "xla",
      f"XLA:CPU's (oneDNN's run on one CPU device, not {jax.device_count()})",
    )
  loaded, detail = cpu_conv.available()
  if loaded:
    return "onednn", f"{detail} on {cpu_conv.cpu_description()}"
  return "xla", f"XLA:CPU's (oneDNN kernels unavailable: {detail})"


@functools.cache
def _set_up_convolutions(line: str) -> None:
  """Once per process: logs which convolutions run and, on CPU, whether a
  step's memory is reused (see `host_memory`)."""
  logging.info("Convolutions: %s.", line)
  if jax.default_backend() == "cpu" and host_memory.kept():
    logging.info("Memory: one malloc arena, freed blocks kept (no faults per step).")


# Every network by its --config.model.name. A model is a Flax module whose
# `__call__(images, *, train)` maps uint8 images (N, H, W, 3) to float32 logits,
# with a `num_classes` field; its other fields with defaults are its settings,
# `config.model.<name>` (except those `create` supplies: RUNTIME_FIELDS). It
# may define `min_image_size(settings)` (checked before training) and
# `FIXED_SETTINGS`, those that fix its parameter shapes (default: all).
MODELS: dict[str, type[nn.Module]] = {
  "simpsons_cnn": SimpsonsCNN,
  "resnet": ResNet,
}
# Fields `create` fills from the config's other groups, where a model has them.
RUNTIME_FIELDS = ("num_classes", "dtype", "onednn", "conv_fn", "parent", "name")


def setting_defaults(cls: type[nn.Module]) -> dict[str, Any]:
  """A model class's settings and their defaults (its own fields)."""
  return {
    field.name: field.default
    for field in dataclasses.fields(cls)
    if field.name not in RUNTIME_FIELDS and field.default is not dataclasses.MISSING
  }


def registered_settings() -> dict[str, dict[str, Any]]:
  """Every registered model's settings and their defaults, by model name."""
  return {name: setting_defaults(cls) for name, cls in MODELS.items()}


def settings(name: str) -> ml_collections.ConfigDict:
  """`config.model` choosing `name`: every registered model's settings at
  their defaults, so that any of them can be chosen and set by flags."""
  model_class_of(name)
  return ml_collections.ConfigDict({"name": name, **registered_settings()})


def fixed_settings(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config keys ('model.<name>.<setting>') that fix the parameter shapes
  of `config`'s model: a run that resumes it may not change them."""
  cls = model_class(config)
  fixed = getattr(cls, "FIXED_SETTINGS", tuple(setting_defaults(cls)))
  return tuple(f"model.{config.model.name}.{key}" for key in fixed)


def min_image_size(config: ml_collections.ConfigDict) -> int:
  """The smallest images `config`'s model takes (1 unless it says)."""
  cls = model_class(config)
  if not hasattr(cls, "min_image_size"):
    return 1
  return cls.min_image_size(config.model[config.model.name])


def model_class_of(name: str) -> type[nn.Module]:
  """The model class registered as `name`."""
  if name not in MODELS:
    raise errors.UserError(
      f"Unknown --config.model.name={name!r}; known: {', '.join(MODELS)}."
    )
  return MODELS[name]


def model_class(config: ml_collections.ConfigDict) -> type[nn.Module]:
  """The model class `config.model.name` names."""
  return model_class_of(config.model.name)


def create(
  config: ml_collections.ConfigDict, num_classes: int, kernels: str = ""
) -> nn.Module:
  """Builds `config.model.name`'s model with its settings for `num_classes`
  characters, computing in `config.train.dtype`, with `kernels`' convolutions
  ('xla' or 'onednn'; '': this machine's, see `conv_implementation`)."""
  cls = model_class(config)
  if not kernels:
    kernels, line = conv_implementation(config)
    _set_up_convolutions(line)
  given = config.model[config.model.name]
  known = setting_defaults(cls)
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise errors.UserError(
      f"config.model.{config.model.name} has settings {cls.__name__} does not "
      f"take ({', '.join(unknown)}); its settings: {', '.join(known)}."
    )
  kwargs = {
    key: tuple(value) if isinstance(value, list | tuple) else value
    for key, value in given.items()
  }
  runtime = {
    "num_classes": num_classes,
    "dtype": jnp.dtype(config.train.dtype),
    "onednn": kernels == "onednn",
    "conv_fn": _conv_fn(kernels),
  }
  fields = {field.name for field in dataclasses.fields(cls)}
  return cls(**kwargs, **{k: v for k, v in runtime.items() if k in fields})


def _conv_fn(kernels: str) -> Callable | None:
  """What replaces `lax.conv_general_dilated` in models that take `conv_fn`."""
  if kernels == "onednn":
    return cpu_conv.conv_general_dilated
  if jax.default_backend() == "cpu":
    # On XLA:CPU the kernel gradients are faster summed over batch chunks.
    return chunked_kernel_grad_conv
  return None


def inference_logits(
  apply_fn: Callable, variables: Any, images: jax.Array, flip: bool = False
) -> jax.Array:
  """Logits for evaluation; with `flip`, the log of the mean of the softmax
  probabilities of the images and their mirrors (test-time augmentation)."""
  return inference_outputs(apply_fn, variables, images, flip)[0]


def inference_outputs(
  apply_fn: Callable, variables: Any, images: jax.Array, flip: bool = False
) -> tuple[jax.Array, jax.Array]:
  """`inference_logits`, and the network's raw logits (with `flip`, the mean
  of the image's and its mirror's), whose scale the energy score reads."""
  logits = apply_fn(variables, images, train=False)
  if not flip:
    return logits, logits
  mirrored = apply_fn(variables, jnp.flip(images, axis=2), train=False)
  both = jnp.stack([jax.nn.log_softmax(logits), jax.nn.log_softmax(mirrored)])
  return jax.nn.logsumexp(both, axis=0) - jnp.log(2.0), (logits + mirrored) / 2


def count_params(params: Any) -> int:
  """The number of scalars in a parameter tree."""
  return sum(x.size for x in jax.tree.leaves(params))
