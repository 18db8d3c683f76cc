"""The train state, the jitted train step, and the training loop.

The loop scores the validation split every epoch and runs `config.evals`'
evaluators (`evaluators`); it stops on request (`stopping`), says what it
does (`reporting`) and fits the finished run's temperatures (`calibrate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from simpsons_jax import (
  calibrate,
  characters,
  checkpointing,
  config_checks,
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
)
from simpsons_jax import losses as losses_lib
from simpsons_jax import trained as trained_run
from simpsons_jax.evaluators import classification

# Folded into a step's dropout key to give the key of its batch mixing.
MIX_STREAM = 1


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
  images = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.uint8)
  variables = model.init(init_rng, images, train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
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
  freeze: tuple[str, ...] = (),
  unfreeze_step: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on (label-smoothed, class-weighted) softmax cross-entropy,
  of the batch as given or mixed (`mix`: mixup or cutmix, see `mixing`).

  Updates BatchNorm statistics (over the global batch) and the EMA; returns
  the batch's sums of the training objective and of correct predictions
  (against each image's own label).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  labels, images = batch["label"], batch["image"]
  if mix != "none":
    images, lam = mixing.mix(
      jax.random.fold_in(dropout_rng, MIX_STREAM), images, mix, mix_alpha
    )

  def objective(logits, labels):
    return losses_lib.cross_entropy(logits, labels, label_smoothing, weights)

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
    "correct": (logits.argmax(-1) == labels).sum(),
    "count": jnp.asarray(losses.shape[0], jnp.float32),
  }
  return state, sums


def _compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """XLA's options for the training step: with oneDNN's convolutions, XLA:CPU
  schedules the step for memory, not to run many ops at once. oneDNN's calls
  already use every core, and an op XLA ran beside one only contended with it
  (docs: the performance notes). The same arithmetic in another order of
  independent ops: results are bitwise equal."""
  if models.conv_implementation(config)[0] != "onednn":
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
  process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
  steps_per_epoch = len(train_split) // config.train.batch_size
  total_steps = steps_per_epoch * config.train.num_epochs

  model = models.create(config, cmap.num_classes)
  manager = checkpointing.create_manager(
    workdir, config.ckpt.keep, metric=config.ckpt.metric
  )
  state = _restore_or_start(manager, model, config, mesh, cmap, steps_per_epoch)
  start_step = int(jax.device_get(state.step))

  weights = losses_lib.class_weights(
    train_split.labels, cmap.num_classes, config.train.class_weights
  )
  train_step_fn = jit_train_step(mesh, config, weights, steps_per_epoch)
  context = evaluators.Context(config, cmap, workdir)
  validation = classification.Classification(
    "validation", {"type": "validation"}, context, examples=val_split
  )
  extra_evals = evaluators.from_config(
    config, dataclasses.replace(context, known=validation)
  )
  score = evaluators.scorer(mesh, model.apply, cmap.num_classes, config.test_time_flip)

  def model_now(step: int, variables: Any = None) -> evaluators.Model:
    variables = state.inference_variables() if variables is None else variables
    return evaluators.Model(score, variables, mesh, step)

  writer = summary.create_writer(workdir / "tensorboard")
  if start_step == 0:
    writer.write_hparams(summary.hparams(config))
  actions = reporting.periodic_actions_of(
    config, workdir, writer, total_steps, start_step
  )

  def save(step: int, val_metrics: Mapping[str, float] | None) -> None:
    meta = _checkpoint_meta(step, steps_per_epoch, cmap, config, val_metrics)
    scores = val_metrics and {f"val_{k}": v for k, v in val_metrics.items()}
    checkpointing.save(manager, state, meta, scores)

  val_metrics: dict[str, float] = {}
  totals, window_start, window_steps = None, time.perf_counter(), 0
  batches = input_pipeline.train_batches(train_split, config, start_step, **process)
  shown = reporting.with_first_batch_shown(batches, writer, start_step)
  try:
    with stopping.StopSignals() as stop:
      for step, batch in zip(
        range(start_step + 1, total_steps + 1),
        sharding.prefetch(shown, mesh),
        strict=True,
      ):
        state, sums = train_step_fn(state, batch)
        checkpointing.raise_failed_save(manager, state)
        for action in actions:
          action(step)
        totals = _accumulate(totals, sums)
        window_steps += 1
        end_of_epoch = step % steps_per_epoch == 0
        validating = end_of_epoch or _every(step, config.train.eval_every_steps)
        saving = validating or _every(step, config.ckpt.every_steps)
        if step % config.train.log_every_steps == 0 or end_of_epoch:
          rate = window_steps * config.train.batch_size
          rate /= time.perf_counter() - window_start
          reporting.training(
            writer, step, totals, rate, config, steps_per_epoch, manager
          )
          totals, window_start, window_steps = None, time.perf_counter(), 0
        if validating or end_of_epoch and extra_evals:
          now = model_now(step)
        if validating:
          val_metrics = validation.run(now).scalars
          reporting.validation(writer, step, val_metrics, steps_per_epoch, manager)
        if end_of_epoch:
          _run_evaluators(extra_evals, now, step // steps_per_epoch, workdir)
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
  if not val_metrics:
    val_metrics = validation.run(model_now(total_steps)).scalars
  calibrate.fit(
    validation, *_checkpoints_to_calibrate(state, workdir, manager, model_now)
  )
  manager.close()
  reporting.finished(total_steps, val_metrics, config, manager)
  return state, val_metrics


def _run_evaluators(
  evaluators_due: list[evaluators.Evaluator],
  model: evaluators.Model,
  epoch: int,
  workdir: epath.Path,
) -> None:
  """Runs the extra evaluators due at the end of `epoch`: their reports in
  `<workdir>/eval/<name>/`, their figures in the log and TensorBoard."""
  for evaluator in evaluators_due:
    if epoch % evaluator.every_epochs:
      continue
    found = evaluator.run(model)
    report = {"checkpoint_step": model.step, **found.report}
    size = f"{report['num_examples']} images" if "num_examples" in report else ""
    reporting.evaluation(evaluator.name, model.step, found.scalars, size)
    if jax.process_index() == 0:
      board = workdir / "tensorboard" / f"eval_{evaluator.name}"
      out = workdir / "eval" / evaluator.name
      evaluators.write(report, out, board, model.step, scalars=found.scalars)


def _checkpoints_to_calibrate(
  state: TrainState, workdir: epath.Path, manager, model_now: Callable
) -> tuple[Callable[[int], evaluators.Model], list[int], epath.Path]:
  """The latest and the best checkpoint, as `calibrate.fit` takes them. A
  multi-process run fits the latest only (the best restores on one device)."""
  latest = int(jax.device_get(state.step))
  steps = [latest]
  best = manager.best_step()
  if best is not None and best != latest and jax.process_count() == 1:
    steps.append(best)

  def model_at(step: int) -> evaluators.Model:
    if step == latest:
      return model_now(step)
    return model_now(step, trained_run.load(workdir, str(step)).variables)

  return model_at, steps, workdir


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
      state = _start_from(state, config, cmap, mesh)
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


def _start_from(
  state: TrainState,
  config: ml_collections.ConfigDict,
  cmap: characters.CharacterMap,
  mesh: Mesh,
) -> TrainState:
  """The fresh state with `config.finetune.init_from`'s weights (see `finetune`)."""
  fresh = {"params": state.params, "batch_stats": state.batch_stats}
  merged = jax.device_put(
    finetune.initialize(jax.device_get(fresh), config, cmap),
    sharding.replicated(mesh),
  )
  ema = None
  if state.ema is not None:
    ema = jax.tree.map(jnp.copy, merged)  # No buffers shared: the state is donated.
  return state.replace(
    params=merged["params"], batch_stats=merged["batch_stats"], ema=ema
  )


def _every(step: int, interval: int) -> bool:
  return interval > 0 and step % interval == 0


def _accumulate(totals, sums):
  """Adds step sums on the device, so no step waits for the host."""
  if totals is None:
    return sums
  return jax.tree.map(jnp.add, totals, sums)
