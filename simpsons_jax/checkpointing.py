"""Orbax checkpoints of the train state, with the run's metadata as JSON.

Each checkpoint holds `state` (step, params, optimizer state, BatchNorm
statistics, EMA, RNG) and `meta`
(epoch, validation metrics, characters, image size). The latest few and the
best by the validation metric `config.ckpt.metric` are kept; a
checkpoint's characters and image size are checked against the workdir's map
and config whenever it is loaded. Orbax writes each checkpoint to a
temporary folder and renames it when complete, so a run killed mid-save
resumes from the last complete one.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Sharding
from orbax.checkpoint import checkpoint_managers

from simpsons_jax import config_upgrade, errors, files, models

CONFIG_FILENAME = "config.json"
# Validation metrics that can rank checkpoints (higher is better).
RANKING_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy")


def create_manager(
  workdir: str | os.PathLike,
  keep: int = 3,
  read_only: bool = False,
  metric: str = "accuracy",
) -> ocp.CheckpointManager:
  """A manager under `<workdir>/checkpoints` keeping the `keep` latest and the
  best by validation `metric`."""
  best = functools.partial(_metric, f"val_{metric}")
  policy = checkpoint_managers.AnyPreservationPolicy(
    [
      checkpoint_managers.LatestN(keep),
      checkpoint_managers.BestN(
        get_metric_fn=best, n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    best_fn=best,
    best_mode="max",
    preservation_policy=policy,
    read_only=read_only,
    create=not read_only,
    cleanup_tmp_directories=not read_only,
  )
  directory = checkpoint_dir(workdir)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`<workdir>/checkpoints`, absolute: local, or on `gs://` for Orbax."""
  workdir = files.as_path(workdir)
  return (workdir.absolute() if files.is_local(workdir) else workdir) / "checkpoints"


def _metric(name: str, metrics: Mapping[str, float]) -> float:
  return metrics.get(name, float("-inf"))


def save(
  manager: ocp.CheckpointManager,
  state: Any,
  meta: Mapping[str, Any],
  metrics: Mapping[str, float] | None,
) -> None:
  """Starts an asynchronous save of `state` at its step; SaveFailed if the
  part written at once (or an earlier save) fails.

  Checkpoints without metrics (saved mid-epoch on a stop) are never `best`.
  """
  step = int(jax.device_get(state.step))
  with _failed_save_said(manager, state):
    manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
      ),
      metrics=metrics and {key: float(value) for key, value in metrics.items()},
    )


class SaveFailed(errors.UserError):
  """A checkpoint could not be written; the message says where, why, how much
  space it needed and which checkpoint is kept."""


def raise_failed_save(
  manager: ocp.CheckpointManager, state: Any, wait: bool = False
) -> None:
  """Raises SaveFailed if an asynchronous save of `state`'s kind by `manager`
  has failed (with `wait`, after the saves under way end: the end of a run).
  Called after every step, so that a full disk stops the run at once, not at
  the next save."""
  with _failed_save_said(manager, state):
    # A finished save's error shows only to wait_until_finished, which returns
    # at once when that save is over.
    if wait or not manager.is_saving_in_progress():
      manager.wait_until_finished()
    manager.check_for_errors()


@contextlib.contextmanager
def _failed_save_said(manager: ocp.CheckpointManager, state: Any) -> Iterator[None]:
  """Turns whatever Orbax or TensorStore raise for a failed save into
  SaveFailed: one sentence with the cause, the space, the checkpoint kept."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds.
    directory = manager.directory
    kept = saved_steps(directory)
    needed = sum(x.nbytes for x in jax.tree.leaves(state))
    cause = files.describe_os_error(e) if isinstance(e, OSError) else str(e)
    if "No space left on device" in cause:  # TensorStore's own words, shortened.
      cause = "No space left on device"
    free = ""
    if files.is_local(directory):
      stats = os.statvfs(directory)
      free = f", {stats.f_bavail * stats.f_frsize / 2**20:.1f} MB free there"
    raise SaveFailed(
      f"Saving a checkpoint to {directory} failed: {cause[:300]}"
      f" (it needs about {needed / 2**20:.1f} MB{free}). "
      + (
        f"The last good checkpoint, step {kept[-1]}, is kept: "
        if kept
        else "No checkpoint was saved yet: "
      )
      + "make room (or choose another --workdir) and run the same command to resume."
    ) from e


def saved_steps(directory: epath.Path) -> list[int]:
  """The steps whose checkpoints were completed in `directory`, in order
  (Orbax's unfinished ones carry a temporary suffix)."""
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def abstract_like(tree: Any, sharding: Sharding) -> Any:
  """Shapes and dtypes of `tree`, to be restored with `sharding`."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
  )


def restore(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
  """Restores checkpoint `step` into the shapes and shardings of `abstract_state`."""
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
    ),
  )
  return restored.state, restored.meta


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes the run's config as `<workdir>/config.json`."""
  files.write_text_atomic(
    files.as_path(workdir) / CONFIG_FILENAME, config.to_json(indent=2) + "\n"
  )


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a workdir was trained with, as today's (`config_upgrade`)."""
  path = files.as_path(workdir) / CONFIG_FILENAME
  if not path.exists():
    raise errors.UserError(
      f"{path} is missing: {workdir} holds no training run (train it with "
      "--mode=train first, or pass the --workdir of a trained run)."
    )
  fix = "restore it from a copy of the run, or train afresh in a new --workdir."
  data = files.read_json(path, fix)
  if not isinstance(data, dict):
    raise files.DamagedFileError(f"{path} is damaged (not a JSON object): {fix}")
  return config_upgrade.upgrade(data, models.registered_settings(), str(path))


def select_step(manager: ocp.CheckpointManager, checkpoint: str) -> int:
  """The step named by `checkpoint`: 'best', 'latest' or a step number."""
  steps = manager.all_steps()
  if not steps:
    raise errors.UserError(f"No checkpoint in {manager.directory}.")
  if checkpoint == "best":
    return manager.best_step()
  if checkpoint == "latest":
    return manager.latest_step()
  if checkpoint.isdigit() and int(checkpoint) in steps:
    return int(checkpoint)
  raise errors.UserError(
    f"--checkpoint={checkpoint!r} is not best, latest or a saved step; "
    f"saved steps: {list(steps)}."
  )


def restore_fields(
  manager: ocp.CheckpointManager, step: int, abstract_fields: Mapping[str, Any]
) -> dict[str, Any]:
  """Reads only some fields of the state of checkpoint `step` (e.g. `params`),
  into the shapes and shardings of `abstract_fields`."""
  item = {key: value for key, value in abstract_fields.items() if value}
  args = ocp.args.PyTreeRestore(
    item=item,
    restore_args=ocp.checkpoint_utils.construct_restore_args(item),
    partial_restore=True,
  )
  restored = manager.restore(step, args=ocp.args.Composite(state=args)).state
  return {key: restored.get(key, value) for key, value in abstract_fields.items()}


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The metadata of checkpoint `step` (epoch, characters, image size, ...)."""
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(meta.meta)
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise files.DamagedFileError(
      f"{manager.directory / str(step) / 'meta'} is damaged ({e}): load another "
      "checkpoint (--checkpoint=<step>) or delete this one."
    ) from e


def check_meta(
  meta: Mapping[str, Any],
  names: tuple[str, ...],
  image_size: int,
  where: str,
) -> None:
  """Refuses a checkpoint whose characters or image size differ from the run's.

  `where` names the checkpoint; `names` come from `characters.json` and
  `image_size` from `config.json`.
  """
  problems = []
  if "characters" in meta and tuple(meta["characters"]) != tuple(names):
    problems.append(
      f"its characters {list(meta['characters'])} are not characters.json's "
      f"{list(names)}"
    )
  if "image_size" in meta and meta["image_size"] != image_size:
    problems.append(
      f"it was trained at image_size={meta['image_size']}, config.json says "
      f"{image_size}"
    )
  if problems:
    raise errors.UserError(
      f"Checkpoint {where} does not belong with this workdir's files: "
      f"{'; '.join(problems)}. Put back the characters.json and config.json "
      "it was trained with, or use that run's own workdir."
    )
