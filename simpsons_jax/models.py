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

from simpsons_jax import convolutions, cpu_conv, errors, threefry


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 ('VALID'), as `nn.max_pool` computes it.

  Written as a reshape and a max: the same values as `nn.max_pool`, but XLA's
  CPU backward pass for it is faster than the one for `reduce_window`
  (docs/performance.md).
  Its gradient goes to each window's maximum, split evenly between ties
  (`cpu_conv`'s fused block computes the same).
  """
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Dropout(nn.Dropout):
  """`nn.Dropout` with its masks drawn by `threefry.bernoulli`: the same masks
  for the same key, without XLA:CPU's loop over whole arrays."""

  @nn.compact
  def __call__(
    self,
    inputs: jax.Array,
    deterministic: bool | None = None,
    rng: jax.Array | None = None,
  ) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask = jnp.broadcast_to(threefry.bernoulli(rng, keep, tuple(shape)), inputs.shape)
    return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


class ConvReluPool(nn.Conv):
  """`nn.Conv`, then ReLU and a 2x2 max pool: one block of the notebook network.

  Its parameters are `nn.Conv`'s (same names, shapes and initialisers). With
  `onednn`, a float32 block runs as `cpu_conv.conv_relu_pool` (bias, ReLU and
  pool fused around oneDNN's convolution, or a direct one on uint8 images;
  with `bfloat16`, the convolution's operands rounded to bfloat16); otherwise
  as `nn.Conv`, `nn.relu` and `max_pool_2x2`. Both compute the same function
  and gradients.
  """

  onednn: bool = False
  bfloat16: bool = False  # The fused block's convolution in bfloat16.
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
      inputs,
      kernel,
      bias,
      strides,
      self.padding,
      self.input_divisor or 1.0,
      self.bfloat16,
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
  onednn: bool = False  # Conv blocks through cpu_conv.conv_relu_pool,
  # Their convolutions' and the dense layers' operands in bfloat16 (oneDNN).
  conv_bfloat16: bool = False

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
        bfloat16=self.conv_bfloat16,
        input_divisor=255.0 if i == 0 else None,
        name=f"conv{i}",
      )(x)
    x = x.reshape(x.shape[0], -1)
    dot = None
    if self.conv_bfloat16:
      dot = functools.partial(cpu_conv.dot_general, bfloat16=True)
    # One key from Flax for the dropout layers, split (in one fused pass) into
    # each layer's: Flax's own, one per layer, cost an XLA:CPU loop each.
    keys = [None] * (len(self.dense_features) + 1)
    if train and self.dropout_rate > 0:
      keys = list(threefry.split(self.make_rng("dropout"), len(keys)))
    for i, features in enumerate(self.dense_features):
      x = Dropout(self.dropout_rate, deterministic=not train)(x, rng=keys[i])
      dense = nn.Dense(
        features,
        kernel_init=glorot,
        dtype=self.dtype,
        dot_general=dot,
        name=f"dense{i}",
      )
      x = nn.relu(dense(x))
    x = Dropout(self.dropout_rate, deterministic=not train)(x, rng=keys[-1])
    logits = nn.Dense(
      self.num_classes,
      kernel_init=glorot,
      dtype=self.dtype,
      dot_general=dot,
      name="logits",
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
    x = Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
    return logits.astype(jnp.float32)


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
RUNTIME_FIELDS = (
  "num_classes",
  "dtype",
  "onednn",
  "conv_bfloat16",
  "conv_fn",
  "parent",
  "name",
)


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
  characters, computing in `config.train.dtype` (see
  `convolutions.precision`), with `kernels`' convolutions
  ('xla' or 'onednn'; '': this machine's, see `conv_implementation`)."""
  cls = model_class(config)
  chosen_here = not kernels
  if chosen_here:
    kernels, line = convolutions.implementation(config)
  dtype, conv_bfloat16, precision_note = convolutions.precision(config, kernels)
  if chosen_here:  # Not for shapes or exports, which name their kernels.
    convolutions.set_up(line, precision_note)
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
    "dtype": dtype,
    "onednn": kernels == "onednn",
    "conv_bfloat16": conv_bfloat16,
    "conv_fn": convolutions.conv_fn(kernels, conv_bfloat16),
  }
  fields = {field.name for field in dataclasses.fields(cls)}
  return cls(**kwargs, **{k: v for k, v in runtime.items() if k in fields})


def init_variables(model: nn.Module, image_size: int, rng: jax.Array) -> dict[str, Any]:
  """Fresh variables of `model` for images of `image_size`: `params` and
  `batch_stats` ({} for a model without BatchNorm). Under `jax.eval_shape`,
  their shapes alone (nothing allocated)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  variables = model.init(rng, images, train=False)
  return {
    "params": variables["params"],
    "batch_stats": variables.get("batch_stats", {}),
  }


def count_params(params: Any) -> int:
  """The number of scalars in a parameter tree."""
  return sum(x.size for x in jax.tree.leaves(params))
