"""More than one process, and checkpoints moving between device counts."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from simpsons_jax import (
  data,
  evaluators,
  input_pipeline,
  metrics,
  models,
  sharding,
  train,
)
from simpsons_jax import trained as trained_run
from simpsons_jax.data import core
from tests.conftest import make_tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _split(config, workdir):
  return data.create(config).prepare(workdir)


def test_process_shards_cover_each_example_once(tiny_config, tmp_path):
  _, train_split, val_split = _split(tiny_config, tmp_path)
  seen = []
  for index in range(3):
    batches = core.eval_batches(val_split, 32, 6, process_index=index, process_count=3)
    assert len(batches) == 4  # ceil(ceil(24 / 3) / 2)
    seen += [
      y for b in batches for y, m in zip(b["label"], b["mask"], strict=True) if m
    ]
  assert sorted(seen) == sorted(val_split.labels.tolist())
  shards = [
    list(train_split.decoded(8, process_index=i, process_count=2).as_numpy_iterator())
    for i in range(2)
  ]
  assert [train_split.shard_size(i, 2) for i in range(2)] == list(map(len, shards))
  assert len(shards[0]) + len(shards[1]) == len(train_split)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(
  tiny_data_dir, tmp_path
):
  config = make_tiny_config(tiny_data_dir)
  config.train.num_epochs = 1
  workdir = tmp_path / "two"
  port = _free_port()
  env = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
  }
  overrides = [
    f"--config.{group}.{key}={values[key]}"
    for group, values, keys in (
      ("data", config.data, ("dir", "min_images", "image_size", "val_fraction")),
      ("train", config.train, ("batch_size", "num_epochs", "log_every_steps")),
      ("model.simpsons_cnn", config.model.simpsons_cnn, ("dense_features",)),
    )
    for key in keys
  ]
  procs = [
    subprocess.Popen(
      [sys.executable, "main.py", "--config=configs/default.py", f"--workdir={workdir}"]
      + overrides
      + [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
      + [f"--process_id={index}"],
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for index in range(2)
  ]
  logs = [p.communicate(timeout=600)[1] for p in procs]
  for proc, log in zip(procs, logs, strict=True):
    assert proc.returncode == 0, log[-3000:]
  assert "epoch 1 validation" in logs[0]
  assert "epoch 1 validation" not in logs[1]  # only process 0 reports
  # Process 0 alone took the workdir (a second holder would have been refused)
  # and wrote its files; process 1 read them.
  assert f"pid {procs[0].pid} " in (workdir / "train.lock").read_text()

  # The same global batches, assembled here in one process on 8 devices.
  cmap, train_split, val_split = _split(config, tmp_path)
  mesh = sharding.make_mesh()
  state = train.initial_state(
    models.create(config, cmap.num_classes),
    config,
    mesh,
    steps_per_epoch=len(train_split) // config.train.batch_size,
  )
  train_step = train.jit_train_step(mesh, config)
  shards = [
    input_pipeline.train_batches(train_split, config, 0, index, 2) for index in range(2)
  ]
  for halves in zip(*shards, strict=True):
    batch = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
    state, _ = train_step(state, sharding.shard_batch(batch, mesh))
  val_batches = core.eval_batches(val_split, 32, config.train.batch_size)
  score = evaluators.scorer(
    mesh, state.apply_fn, cmap.num_classes, config.test_time_flip
  )
  variables = state.inference_variables()
  totals, _ = evaluators.accumulate(score, variables, val_batches, mesh)
  reference = metrics.summarize(totals)

  # Written by 2 processes, read back by 1 on one device.
  trained = trained_run.load(workdir, checkpoint="latest")
  assert trained.step == int(state.step) == len(train_split) // config.train.batch_size
  for a, b in zip(
    jax.tree.leaves(jax.device_get(state.params)),
    jax.tree.leaves(trained.variables["params"]),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, atol=2 * config.optim.learning_rate)
  logged = float(logs[0].split("epoch 1 validation: loss ")[1].split(",")[0])
  assert logged == pytest.approx(reference["loss"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(8, 1), (1, 8)])
def test_checkpoints_move_between_device_counts(tiny_config, tmp_path, first, second):
  tiny_config.train.num_epochs = 1
  train.train_and_evaluate(
    tiny_config, tmp_path, mesh=sharding.make_mesh(jax.devices()[:first])
  )
  tiny_config.train.num_epochs = 2
  state, metrics = train.train_and_evaluate(
    tiny_config, tmp_path, mesh=sharding.make_mesh(jax.devices()[:second])
  )
  assert int(state.step) == 12
  assert state.params["conv0"]["kernel"].sharding.mesh.size == second
  assert np.isfinite(metrics["loss"])
