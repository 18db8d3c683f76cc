"""The optimizer, its learning-rate schedule, and the EMA of the weights."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from simpsons_jax import errors, freezing

EMA_WARMUP = 10  # The EMA decay ramps up as (1 + t) / (EMA_WARMUP + t).


def learning_rate(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> float | optax.Schedule:
  """The config's learning rate: constant, or linear warmup then cosine to 0."""
  if config.optim.schedule == "constant":
    return config.optim.learning_rate
  if config.optim.schedule == "cosine":
    total_steps = steps_per_epoch * config.train.num_epochs
    warmup_steps = min(
      round(config.optim.warmup_epochs * steps_per_epoch), total_steps - 1
    )
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.optim.learning_rate,
      warmup_steps=warmup_steps,
      decay_steps=total_steps,
      end_value=0.0,
    )
  raise errors.UserError(
    f"Unknown --config.optim.schedule={config.optim.schedule!r}; "
    "use constant or cosine."
  )


def decay_mask(params: Any) -> Any:
  """True for kernels: biases and normalisation scales are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """Adam (the notebook's), AdamW, or SGD with Nesterov momentum 0.9; then
  the frozen layers and learning-rate multipliers of `freezing`, if any."""
  tx = _base(config, steps_per_epoch)
  freeze, multipliers = config.finetune.freeze, config.finetune.lr_multipliers
  if freeze or multipliers:
    unfreeze = freezing.unfreeze_step(config, steps_per_epoch)
    tx = optax.chain(tx, freezing.scale_updates(freeze, multipliers, unfreeze))
  return tx


def _base(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  lr = learning_rate(config, steps_per_epoch)
  if config.optim.name == "adam":
    return optax.adam(lr)
  if config.optim.name == "adamw":
    return optax.adamw(lr, weight_decay=config.optim.weight_decay, mask=decay_mask)
  if config.optim.name == "sgd":
    return optax.chain(
      optax.add_decayed_weights(config.optim.weight_decay, mask=decay_mask),
      optax.sgd(lr, momentum=0.9, nesterov=True),
    )
  raise errors.UserError(
    f"Unknown --config.optim.name={config.optim.name!r}; use adam, adamw or sgd."
  )


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The decay used after `step` updates: min(decay, (1 + step) / (10 + step)).

  The ramp keeps the first, random weights from dominating a short run.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (EMA_WARMUP + step))


def update_ema(ema: Any, new: Any, decay: jax.Array) -> Any:
  """decay * ema + (1 - decay) * new, leaf by leaf."""
  return jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, ema, new)
