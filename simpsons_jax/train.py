"""The train state, the jitted train and eval steps, and the training loop."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from simpsons_jax import (
  calibration,
  characters,
  checkpointing,
  config_checks,
  data,
  errors,
  evaluators,
  files,
  finetune,
  footprint,
  freezing,
  input_pipeline,
  metrics,
  mixing,
  models,
  optimizers,
  run_folder,
  sharding,
  summary,
)
from simpsons_jax import trained as trained_run

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


def class_weights(labels: np.ndarray, num_classes: int, kind: str) -> np.ndarray | None:
  """Loss weight per character: None, or n / (K * n_c) for 'balanced'.

  Balanced weights make every character count as much in the loss as if
  all had the same number of training images; their mean over images is 1.
  """
  if kind == "none":
    return None
  if kind == "balanced":
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.divide(
      len(labels), num_classes * counts, out=np.zeros_like(counts), where=counts > 0
    )
    return weights.astype(np.float32)
  raise errors.UserError(
    f"Unknown --config.train.class_weights={kind!r}; use none or balanced."
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
    if label_smoothing:
      targets = optax.smooth_labels(
        jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing
      )
      losses = optax.softmax_cross_entropy(logits, targets)
    else:
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses if weights is None else losses * weights[labels]

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


class Interrupted(Exception):
  """Training stopped on SIGINT or SIGTERM after saving a checkpoint."""

  def __init__(self, signum: int, step: int, directory: epath.Path):
    self.signum, self.step = signum, step
    super().__init__(
      f"{signal.Signals(signum).name} received: stopped at step {step} with a "
      f"checkpoint in {directory}. Run the same command to resume."
    )


class _StopSignals:
  """Turns SIGINT and SIGTERM into a request to stop at the next step.

  A second signal stops at once, as Python's default handler would.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    if self.received is not None:
      raise KeyboardInterrupt
    self.received = signum
    logging.warning(
      "%s received: saving a checkpoint after this step (send it again to quit "
      "at once).",
      signal.Signals(signum).name,
    )

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _check_finite(values: Mapping[str, float], what: str, step: int, manager) -> None:
  if not np.isfinite(values["loss"]):
    raise errors.UserError(
      f"{what} loss is {values['loss']} at step {step}: training stopped. The "
      f"last good checkpoint (step {manager.latest_step()}) is kept in "
      f"{manager.directory}; lower --config.optim.learning_rate and resume, or use "
      "--config.restart=True."
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

  weights = class_weights(
    train_split.labels, cmap.num_classes, config.train.class_weights
  )
  train_step_fn = jit_train_step(mesh, config, weights, steps_per_epoch)
  extra_evals = evaluators.from_config(config, cmap, workdir)
  score = evaluators.scorer(mesh, model.apply, cmap.num_classes, config.test_time_flip)
  validation = _Validation(score, _val_batches(val_split, config, process), mesh)

  writer = summary.create_writer(workdir / "tensorboard")
  if start_step == 0:
    writer.write_hparams(summary.hparams(config))
  actions = _periodic_actions(config, workdir, writer, total_steps, start_step)

  def save(step: int, val_metrics: Mapping[str, float] | None) -> None:
    meta = _checkpoint_meta(step, steps_per_epoch, cmap, config, val_metrics)
    scores = val_metrics and {f"val_{k}": v for k, v in val_metrics.items()}
    checkpointing.save(manager, state, meta, scores)

  val_metrics: dict[str, float] = {}
  totals, window_start, window_steps = None, time.perf_counter(), 0
  batches = input_pipeline.train_batches(train_split, config, start_step, **process)
  try:
    with _StopSignals() as stop:
      for step, batch in zip(
        range(start_step + 1, total_steps + 1),
        sharding.prefetch(_with_first_batch_shown(batches, writer, start_step), mesh),
        strict=True,
      ):
        state, sums = train_step_fn(state, batch)
        checkpointing.raise_failed_save(manager, state)
        for action in actions:
          action(step)
        totals = _accumulate(totals, sums)
        window_steps += 1
        end_of_epoch = step % steps_per_epoch == 0
        epoch = step // steps_per_epoch
        validating = end_of_epoch or _every(step, config.train.eval_every_steps)
        saving = validating or _every(step, config.ckpt.every_steps)
        if step % config.train.log_every_steps == 0 or end_of_epoch:
          rate = window_steps * config.train.batch_size
          rate /= time.perf_counter() - window_start
          _report_training(writer, step, totals, rate, config, steps_per_epoch, manager)
          totals, window_start, window_steps = None, time.perf_counter(), 0
        if validating:
          val_metrics = validation.metrics(state.inference_variables())
          _report_validation(writer, step, val_metrics, steps_per_epoch, manager)
        for extra in extra_evals if end_of_epoch else ():
          if epoch % extra.every_epochs == 0:
            _run_extra(extra, score, state, mesh, config, cmap, workdir, step)
        if saving:
          save(step, val_metrics if validating else None)
        if stop.received is not None:
          if not saving:
            save(step, None)
          raise Interrupted(stop.received, step, manager.directory)
  finally:
    # A save already started completes, whatever ended the loop.
    writer.close()
    checkpointing.raise_failed_save(manager, state, wait=True)
  if not val_metrics:
    val_metrics = validation.metrics(state.inference_variables())
  _calibrate(validation, state, workdir, manager)
  _log_finished(total_steps, val_metrics, config, manager)
  return state, val_metrics


def _log_finished(
  step: int,
  val_metrics: Mapping[str, float],
  config: ml_collections.ConfigDict,
  manager,
) -> None:
  logging.info(
    "Finished at step %d: validation accuracy %.4f; best checkpoint by %s: "
    "step %s in %s.",
    *(step, val_metrics["accuracy"], config.ckpt.metric),
    *(manager.best_step(), manager.directory),
  )


def _val_batches(
  val_split: data.core.Examples,
  config: ml_collections.ConfigDict,
  process: Mapping[str, int],
) -> list[input_pipeline.Batch]:
  """The validation split's padded batches (made once: the images cached)."""
  return input_pipeline.eval_batches(
    val_split,
    config.data.image_size,
    config.train.batch_size,
    config.data.cache_dir,
    **process,
  )


@dataclasses.dataclass(frozen=True)
class _Validation:
  """Scoring the validation split: its metrics, or its examples' outputs."""

  score: Callable
  batches: list[input_pipeline.Batch]
  mesh: Mesh

  def metrics(self, variables: Any) -> dict[str, float]:
    return metrics.summarize(self.outputs(variables)[0])

  def outputs(self, variables: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return evaluators.accumulate(self.score, variables, self.batches, self.mesh)


def _calibrate(
  validation: _Validation, state: TrainState, workdir: epath.Path, manager
) -> None:
  """Fits the temperature of the latest and the best checkpoint on the
  validation split (`calibration`), kept in the workdir by process 0. A
  multi-process run fits the latest only (the best restores on one device)."""
  steps = {int(jax.device_get(state.step)): state.inference_variables()}
  best = manager.best_step()
  if best is not None and best not in steps and jax.process_count() == 1:
    steps[best] = trained_run.load(workdir, str(best)).variables
  for step, variables in sorted(steps.items()):
    _, rows = validation.outputs(variables)
    if len(rows["labels"]) < calibration.MIN_EXAMPLES:
      logging.warning(
        "Not calibrated: %d validation images are too few to fit a temperature "
        "(at least %d); predictions use T = 1.",
        *(len(rows["labels"]), calibration.MIN_EXAMPLES),
      )
      if jax.process_index() == 0:
        for unfitted in steps:
          calibration.save(
            workdir, unfitted, calibration.not_fitted(len(rows["labels"]))
          )
      break
    fitted = calibration.record(rows["probabilities"], rows["labels"])
    if jax.process_index() == 0:
      calibration.save(workdir, step, fitted)
    logging.info(
      "Calibrated step %d on %d validation images: temperature %.3f, ECE %.4f -> "
      "%.4f, NLL %.4f -> %.4f.",
      *(step, fitted["examples"], fitted["temperature"]),
      *(fitted["ece"]["before"], fitted["ece"]["after"]),
      *(fitted["nll"]["before"], fitted["nll"]["after"]),
    )
  manager.close()


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


def _periodic_actions(
  config: ml_collections.ConfigDict,
  workdir: epath.Path,
  writer: metric_writers.MetricWriter,
  total_steps: int,
  start_step: int,
) -> list[periodic_actions.PeriodicAction]:
  """CLU's progress report (steps/s, ETA), and the profiler if asked for."""
  actions: list[periodic_actions.PeriodicAction] = [
    periodic_actions.ReportProgress(
      num_train_steps=total_steps,
      writer=writer,
      every_steps=config.train.log_every_steps,
    )
  ]
  if config.train.profile_steps and jax.process_index() == 0:
    actions.append(
      periodic_actions.Profile(
        logdir=str(workdir / "tensorboard"),
        num_profile_steps=config.train.profile_steps,
        profile_duration_ms=None,
        first_profile=start_step + 2,  # The first step compiles.
        every_secs=None,
      )
    )
  return actions


def _report_training(
  writer: metric_writers.MetricWriter,
  step: int,
  totals: Any,
  rate: float,
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  manager,
) -> None:
  """The training metrics since the last report: checked, logged, written."""
  train_metrics = metrics.summarize(jax.device_get(totals))
  _check_finite(train_metrics, "Training", step, manager)
  writer.write_scalars(step, {f"train_{k}": v for k, v in train_metrics.items()})
  writer.write_scalars(step, {"train_images_per_second": rate})
  logging.info(
    "epoch %d/%d step %d/%d: loss %.4f, accuracy %.4f, %.0f images/s",
    (step - 1) // steps_per_epoch + 1,
    config.train.num_epochs,
    step,
    steps_per_epoch * config.train.num_epochs,
    train_metrics["loss"],
    train_metrics["accuracy"],
    rate,
  )


def _report_validation(
  writer: metric_writers.MetricWriter,
  step: int,
  val_metrics: Mapping[str, float],
  steps_per_epoch: int,
  manager,
) -> None:
  """Validation metrics: checked, written, logged."""
  _check_finite(val_metrics, "Validation", step, manager)
  writer.write_scalars(step, {f"val_{k}": v for k, v in val_metrics.items()})
  writer.flush()
  logging.info(
    "epoch %.4g validation: %s",
    step / steps_per_epoch,
    ", ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()),
  )


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


def _run_extra(extra, score, state, mesh, config, cmap, workdir: epath.Path, step: int):
  """Scores an extra evaluator, writes its report and TensorBoard figures."""
  variables = state.inference_variables()
  result, _ = extra.run(score, variables, mesh, config, cmap.names)
  result = {"checkpoint_step": step, **result}
  logging.info(
    "%s at step %d: accuracy %.4f, top-3 %.4f, macro-F1 %.4f on %d images",
    extra.name,
    step,
    result["accuracy"],
    result["top3_accuracy"],
    result["macro_f1"],
    result["num_examples"],
  )
  if jax.process_index() == 0:
    board = workdir / "tensorboard" / f"eval_{extra.name}"
    evaluators.write(result, workdir / "eval" / extra.name, board, step)


def _accumulate(totals, sums):
  """Adds step sums on the device, so no step waits for the host."""
  if totals is None:
    return sums
  return jax.tree.map(jnp.add, totals, sums)


def _with_first_batch_shown(
  batches, writer: metric_writers.MetricWriter, start_step: int
):
  """Passes batches through, writing a grid of the first one to TensorBoard."""
  for i, batch in enumerate(batches):
    if i == 0 and start_step == 0:
      writer.write_images(0, {"train_inputs": batch["image"]})
    yield batch
