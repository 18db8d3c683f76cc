"""Real processes, real signals: a killed or stopped run resumes exactly.

Each case starts `main.py` as a subprocess, sends a signal when its log
reaches a given point, runs the same command again (stopping it again at a
later point), then to the end, and compares the final weights with an
uninterrupted run.
"""

import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import default
from simpsons_jax import train
from simpsons_jax import trained as trained_run

ROOT = Path(__file__).resolve().parents[1]
# 96 training images in batches of 16: 6 steps per epoch, 18 in all.
OVERRIDES = {
  "data.min_images": 1,
  "data.image_size": 64,
  "data.val_fraction": 0.2,
  "model.simpsons_cnn.dense_features": (64, 64),
  "train.batch_size": 16,
  "train.num_epochs": 3,
  "train.log_every_steps": 1,
}


def _command(workdir: Path, data_dir: Path) -> list[str]:
  return [
    sys.executable,
    "main.py",
    "--config=configs/default.py",
    f"--workdir={workdir}",
    f"--config.data.dir={data_dir}",
    *(f"--config.{key}={value}" for key, value in OVERRIDES.items()),
  ]


def _run(command, stop_at: str | None = None, signum: int = signal.SIGKILL):
  """Runs `command`; sends `signum` once a log line matches `stop_at`."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(
    command,
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  log = []
  for line in proc.stderr:
    log.append(line)
    if stop_at and re.search(stop_at, line):
      proc.send_signal(signum)
      break
  log += proc.stderr.readlines()
  proc.wait(timeout=300)
  if stop_at and not any(re.search(stop_at, line) for line in log):
    pytest.fail(f"the run ended before {stop_at!r}:\n{''.join(log[-30:])}")
  return proc.returncode, "".join(log)


@pytest.fixture(scope="module")
def reference(tiny_data_dir, tmp_path_factory):
  """Final parameters of an uninterrupted run, in this process."""
  config = default.get_config()
  config.data.dir = str(tiny_data_dir)
  for key, value in OVERRIDES.items():
    *groups, last = key.split(".")
    functools.reduce(getattr, groups, config)[last] = value
  state, _ = train.train_and_evaluate(config, tmp_path_factory.mktemp("reference"))
  return jax.tree.leaves(jax.device_get(state.params))


def _final_params(workdir):
  trained = trained_run.load(workdir, checkpoint="latest")
  assert trained.step == 18
  return jax.tree.leaves(jax.device_get(trained.variables["params"]))


@pytest.mark.slow
def test_killed_at_three_moments_each_rerun_resumes_and_ends_as_uninterrupted(
  reference, tiny_data_dir, tmp_path
):
  command = _command(tmp_path, tiny_data_dir)
  for stop_at in (
    r"epoch 1 validation",  # as the asynchronous checkpoint save starts
    r"epoch 2/3 step 9/18",  # mid-epoch, during a step
    r"epoch 2/3 step 12/18",  # as the end-of-epoch evaluation starts
  ):
    returncode, _ = _run(command, stop_at, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, stop_at
  returncode, log = _run(command)
  assert returncode == 0, log[-3000:]
  # From the last complete checkpoint, or from the start where none was.
  assert "Resumed from step" in log or "epoch 1/3 step 1/18" in log
  for a, b in zip(reference, _final_params(tmp_path), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_then_sigint_each_save_and_the_run_resumes(
  reference, tiny_data_dir, tmp_path
):
  command = _command(tmp_path, tiny_data_dir)
  stopped = [0]
  for signum, stop_at, steps in (
    (signal.SIGTERM, r"epoch 2/3 step 8/18", range(8, 12)),
    (signal.SIGINT, r"epoch 3/3 step 14/18", range(14, 18)),
  ):
    returncode, log = _run(command, stop_at, signum)
    assert returncode == 128 + signum, log[-3000:]
    assert "Run the same command to resume" in log
    if stopped[-1]:
      assert f"Resumed from step {stopped[-1]}" in log
    stopped.append(int(re.search(r"stopped at step (\d+)", log)[1]))
    assert stopped[-1] in steps
    saved = {int(p.name) for p in (tmp_path / "checkpoints").iterdir()}
    assert stopped[-1] in saved  # a mid-epoch checkpoint
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  returncode, log = _run(command)
  assert returncode == 0, log[-3000:]
  assert f"Resumed from step {stopped[-1]}" in log
  for a, b in zip(reference, _final_params(tmp_path), strict=True):
    np.testing.assert_array_equal(a, b)
