"""The train state, the jitted train step, and the training loop.

The loop scores the validation split every epoch and runs `config.evals`'
evaluators (`evaluators`); it stops on request (`stopping`), says what it
does (`reporting`) and fits the finished run's temperatures
(`evaluators.in_training`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from simpsons_jax import (
  checkpointing,
  config_checks,
  convolutions,
  data,
  evaluators,
  files,
  finetune,
  footprint,
  freezing,
  input_pipeline,
  mixing,
  models,
  optimizers,
  reporting,
  run_folder,
  sharding,
  stopping,
  summary,
  threefry,
)
from simpsons_jax import losses as losses_lib
from simpsons_jax.evaluators import in_training

# Folded into a step's dropout key to give the key of its batch mixing.
MIX_STREAM = 1

if TYPE_CHECKING:
  from simpsons_jax import characters


class TrainState(train_state.TrainState):
  """Step, params and optimizer state, BatchNorm statistics, the EMA of the
  weights (None when off) and the base key for dropout."""

  rng: jax.Array
  batch_stats: Any = flax.struct.field(default_factory=dict)
  ema: Any = None

  def inference_variables(self) -> dict[str, Any]:
    """The variables evaluation and prediction use: the EMA if there is one."""
    if self.ema is not None:
      return self.ema
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  rng: jax.Array,
  steps_per_epoch: int,
) -> TrainState:
  """Fresh variables and optimizer state for `model` on the config's images."""
  init_rng, dropout_rng = jax.random.split(rng)
  variables = models.init_variables(model, config.data.image_size, init_rng)
  params, batch_stats = variables["params"], variables["batch_stats"]
  ema = None
  if config.optim.ema_decay > 0:
    # Copies: the train step donates the state, so no two fields may share buffers.
    ema = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
  return TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=optimizers.create(config, steps_per_epoch),
    rng=dropout_rng,
    batch_stats=batch_stats,
    ema=ema,
  )


def initial_state(
  model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh, steps_per_epoch: int
) -> TrainState:
  """The state a run starts from, seeded by `config.seed`, replicated on `mesh`."""
  init = functools.partial(
    create_train_state, model, config, steps_per_epoch=steps_per_epoch
  )
  # Partitionable threefry (the default, used for dropout) takes XLA:CPU
  # seconds per parameter shape to compile; initial values need no sharding.
  with jax.threefry_partitionable(False):
    return jax.jit(init, out_shardings=sharding.replicated(mesh))(
      jax.random.PRNGKey(config.seed)
    )


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  label_smoothing: float = 0.0,
  weights: jax.Array | None = None,
  ema_decay: float = 0.0,
  mix: str = "none",
  mix_alpha: float = 1.0,
  negatives_weight: float = 0.0,
  freeze: tuple[str, ...] = (),
  unfreeze_step: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on (label-smoothed, class-weighted) softmax cross-entropy,
  of the batch as given or mixed (`mix`: mixup or cutmix, see `mixing`).

  Updates BatchNorm statistics (over the global batch) and the EMA; returns
  the batch's sums of the training objective and of correct predictions
  (against each image's own label).
  """
  dropout_rng = threefry.fold_in(state.rng, state.step)
  labels, images = batch["label"], batch["image"]
  if mix != "none":
    images, lam = mixing.mix(
      threefry.fold_in(dropout_rng, MIX_STREAM), images, mix, mix_alpha
    )

  def objective(logits, labels):
    return losses_lib.objective(
      logits, labels, label_smoothing, weights, negatives_weight
    )

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      images,
      train=True,
      rngs={"dropout": dropout_rng},
      mutable=["batch_stats"],
    )
    losses = objective(logits, labels)
    if mix != "none":
      losses = lam * losses + (1 - lam) * objective(logits, mixing.partners(labels))
    return losses.mean(), (losses, logits, updates.get("batch_stats", {}))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (losses, logits, batch_stats)), grads = grad_fn(state.params)
  batch_stats = freezing.keep_frozen_stats(
    state.batch_stats, batch_stats, freeze, state.step, unfreeze_step
  )
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema is not None:
    new = {"params": state.params, "batch_stats": state.batch_stats}
    decay = optimizers.ema_decay_at(state.step, ema_decay)
    state = state.replace(ema=optimizers.update_ema(state.ema, new, decay))
  sums = {
    "loss_sum": losses.sum(),
    "correct": (logits.argmax(-1) == labels).sum(),  # Never a negative's.
    "count": jnp.asarray(losses.shape[0], jnp.float32),
    "negatives": (labels < 0).sum(),
  }
  return state, sums


def _compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """XLA's options for the training step: with oneDNN's convolutions, XLA:CPU
  schedules the step for memory, not to run many ops at once. oneDNN's calls
  already use every core, and an op XLA ran beside one only contended with it
  (docs: the performance notes). The same arithmetic in another order of
  independent ops: results are bitwise equal."""
  if convolutions.implementation(config)[0] != "onednn":
    return None
  return {"xla_cpu_enable_concurrency_optimized_scheduler": False}


def jit_train_step(
  mesh: Mesh,
  config: ml_collections.ConfigDict,
  weights: np.ndarray | None = None,
  steps_per_epoch: int = 1,
) -> Callable:
  """`train_step` with the config's options, compiled for `mesh`, the state
  donated. `weights` are the per-character loss weights; `steps_per_epoch`
  places `unfreeze_after_epochs`."""
  state_sharding = sharding.replicated(mesh)
  step = functools.partial(
    train_step,
    label_smoothing=config.train.label_smoothing,
    negatives_weight=config.train.negatives_weight,
    weights=None if weights is None else jnp.asarray(weights),
    ema_decay=config.optim.ema_decay,
    mix=config.train.mix,
    mix_alpha=config.train.mix_alpha,
    freeze=tuple(config.finetune.freeze),
    unfreeze_step=freezing.unfreeze_step(config, steps_per_epoch),
  )
  return jax.jit(
    step,
    in_shardings=(state_sharding, sharding.data_sharding(mesh)),
    out_shardings=(state_sharding, state_sharding),
    donate_argnums=0,
    compiler_options=_compiler_options(config),
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, float]]:
  """Trains to `config.train.num_epochs`, resuming from `workdir` if it holds a run.

  Returns the final state and the last validation metrics. Raises
  `Interrupted` after saving a checkpoint when SIGINT or SIGTERM arrives.
  """
  workdir = files.as_path(workdir)
  mesh = sharding.make_mesh() if mesh is None else mesh
  config_checks.check(config, mesh, evaluators.problems(config.evals))
  is_process_0 = jax.process_index() == 0
  with run_folder.lock(workdir) if is_process_0 else contextlib.nullcontext():
    if is_process_0:
      run_folder.prepare(config, workdir)
    sharding.describe_devices(mesh, config.train.require_accelerator)
    source = data.create(config)
    if is_process_0:
      cmap, train_split, val_split = source.prepare(workdir)
      footprint.check_cache(config, len(train_split) + len(val_split))
      checkpointing.save_config(workdir, config)
    if jax.process_count() > 1:  # The others read what process 0 decided.
      multihost_utils.sync_global_devices("workdir prepared")
    if not is_process_0:
      cmap, train_split, val_split = source.load(workdir)
    logging.info(
      "Data: %d characters, %d training and %d validation images.",
      *(cmap.num_classes, len(train_split), len(val_split)),
    )
    return _train(config, workdir, mesh, cmap, train_split, val_split)


def _train(
  config: ml_collections.ConfigDict,
  workdir: epath.Path,
  mesh: Mesh,
  cmap: characters.CharacterMap,
  train_split: data.core.Examples,
  val_split: data.core.Examples,
) -> tuple[TrainState, dict[str, float]]:
  steps_per_epoch = len(train_split) // config.train.batch_size
  total_steps = steps_per_epoch * config.train.num_epochs

  model = models.create(config, cmap.num_classes)
  manager = checkpointing.create_manager(
    workdir, config.ckpt.keep, metric=config.ckpt.metric
  )
  state = _restore_or_start(manager, model, config, mesh, cmap, steps_per_epoch)
  start_step = int(jax.device_get(state.step))
  train_step_fn = _step_of(config, mesh, train_split, cmap, steps_per_epoch)
  evaluation = in_training.Evaluations(
    config, cmap, workdir, mesh, model.apply, val_split, train_split
  )

  def model_now(step: int) -> evaluators.Model:
    return evaluation.model(step, state.inference_variables())

  writer, actions = _reporters(config, workdir, total_steps, start_step)

  def save(step: int, val_metrics: Mapping[str, float] | None) -> None:
    meta = _checkpoint_meta(step, steps_per_epoch, cmap, config, val_metrics)
    _save(manager, state, meta)

  val_metrics: dict[str, float] = {}
  window = reporting.Window()
  batches = reporting.with_first_batch_shown(
    input_pipeline.train_batches(
      train_split, config, start_step, jax.process_index(), jax.process_count()
    ),
    writer,
    start_step,
  )
  try:
    with stopping.StopSignals() as stop:
      for step, batch in zip(
        range(start_step + 1, total_steps + 1),
        sharding.prefetch(batches, mesh),
        strict=True,
      ):
        state, sums = train_step_fn(state, batch)
        checkpointing.raise_failed_save(manager, state)
        for action in actions:
          action(step)
        window.add(sums)
        end_of_epoch = step % steps_per_epoch == 0
        validating = end_of_epoch or _every(step, config.train.eval_every_steps)
        saving = validating or _every(step, config.ckpt.every_steps)
        if step % config.train.log_every_steps == 0 or end_of_epoch:
          window.report(writer, step, config, steps_per_epoch, manager)
        if validating:
          now = model_now(step)
          val_metrics = evaluation.validation.run(now).scalars
          reporting.validation(writer, step, val_metrics, steps_per_epoch, manager)
        if end_of_epoch:
          evaluation.run_extra(now, step // steps_per_epoch)
        if saving:
          save(step, val_metrics if validating else None)
        if stop.received is not None:
          if not saving:
            save(step, None)
          raise stopping.Interrupted(stop.received, step, manager.directory)
  finally:
    # A save already started completes, whatever ended the loop.
    writer.close()
    checkpointing.raise_failed_save(manager, state, wait=True)
  val_metrics = _finish(evaluation, model_now(total_steps), val_metrics, manager)
  return state, val_metrics


def _finish(
  evaluation: in_training.Evaluations,
  last: evaluators.Model,
  val_metrics: dict[str, float],
  manager,
) -> dict[str, float]:
  """After the last step: its validation figures (scored now if the loop did
  not), the temperatures fitted, the closing line."""
  if not val_metrics:
    val_metrics = evaluation.validation.run(last).scalars
  in_training.fit_after_training(evaluation, last, evaluation.model, manager)
  manager.close()
  reporting.finished(last.step, val_metrics, evaluation.config, manager)
  return val_metrics


def _step_of(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  train_split: data.core.Examples,
  cmap: characters.CharacterMap,
  steps_per_epoch: int,
) -> Callable:
  """The jitted train step of `config`, its class weights from the split."""
  weights = losses_lib.class_weights(
    train_split.labels, cmap.num_classes, config.train.class_weights
  )
  return jit_train_step(mesh, config, weights, steps_per_epoch)


def _reporters(
  config: ml_collections.ConfigDict,
  workdir: epath.Path,
  total_steps: int,
  start_step: int,
) -> tuple[metric_writers.MetricWriter, list]:
  """The run's TensorBoard writer (the config's hparams written once, at
  the start) and its periodic actions (progress, profile)."""
  writer = summary.create_writer(workdir / "tensorboard")
  if start_step == 0:
    writer.write_hparams(summary.hparams(config))
  actions = reporting.periodic_actions_of(
    config, workdir, writer, total_steps, start_step
  )
  return writer, actions


def _save(manager, state: TrainState, meta: dict[str, Any]) -> None:
  """Starts saving `state` with its `meta`; its validation figures rank it."""
  scores = meta["val"] and {f"val_{k}": v for k, v in meta["val"].items()}
  checkpointing.save(manager, state, meta, scores or None)


def _checkpoint_meta(
  step: int,
  steps_per_epoch: int,
  cmap: characters.CharacterMap,
  config: ml_collections.ConfigDict,
  val_metrics: Mapping[str, float] | None,
) -> dict[str, Any]:
  """What a checkpoint says of itself (read back by `checkpointing.check_meta`)."""
  return {
    "epoch": step / steps_per_epoch,
    "step": step,
    "characters": list(cmap.names),
    "image_size": config.data.image_size,
    "val": dict(val_metrics or {}),
  }


def _restore_or_start(
  manager,
  model: nn.Module,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  cmap: characters.CharacterMap,
  steps_per_epoch: int,
) -> TrainState:
  """The run's latest checkpoint, checked against its characters and image
  size; or a fresh state (from `config.finetune.init_from` if set)."""
  latest = manager.latest_step()
  if latest is None:
    state = initial_state(model, config, mesh, steps_per_epoch)
    if config.finetune.init_from:
      state = finetune.start_from(state, config, cmap, sharding.replicated(mesh))
  else:
    checkpointing.check_meta(
      checkpointing.restore_meta(manager, latest),
      cmap.names,
      config.data.image_size,
      f"step {latest} in {manager.directory}",
    )
    shapes = jax.eval_shape(
      functools.partial(
        create_train_state, model, config, steps_per_epoch=steps_per_epoch
      ),
      jax.random.PRNGKey(config.seed),
    )
    abstract = checkpointing.abstract_like(shapes, sharding.replicated(mesh))
    state, _ = checkpointing.restore(manager, latest, abstract)
    logging.info("Resumed from step %d in %s.", latest, manager.directory)
  logging.info(
    "Model %s: %s parameters.",
    config.model.name,
    f"{models.count_params(state.params):,}",
  )
  if config.finetune.freeze or config.finetune.lr_multipliers:
    logging.info("Fine-tuning: %s.", freezing.describe(state.params, config))
  return state


def _every(step: int, interval: int) -> bool:
  return interval > 0 and step % interval == 0
