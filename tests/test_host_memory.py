"""host_memory: XLA:CPU's step memory is reused, not page-faulted through anew."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A jitted function whose 128 MB temporary (over glibc's 64 MiB per-thread heap)
# is allocated on XLA's threads; prints the minor page faults of each call.
# PROBE_CALL=first calls host_memory.keep_freed_memory() first (as main.py
# does), =late only after JAX has run.
_PROBE = """
import json, os, resource
import simpsons_jax
from simpsons_jax import host_memory
if os.environ["PROBE_CALL"] == "first":
  host_memory.keep_freed_memory()
import jax, jax.numpy as jnp

f = jax.jit(lambda x, w: jnp.dot(jnp.tanh(jnp.dot(x, w)), w.T))
x, w = jnp.ones((8192, 16)), jnp.ones((16, 4096))
temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"set": host_memory.keep_freed_memory(), "temp_pages": temp // 4096,
                  "faults": faults}))
"""


def _probe(call: str, **env: str) -> dict:
  out = subprocess.run(
    [sys.executable, "-c", _PROBE],
    env=os.environ | {"JAX_PLATFORMS": "cpu", "PROBE_CALL": call} | env,
    cwd=Path(__file__).resolve().parents[1],
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1]) | {"log": out.stderr}


@pytest.mark.slow
def test_a_step_reuses_its_memory_instead_of_faulting_through_it():
  kept = _probe("first")
  assert kept["set"] is True
  assert kept["temp_pages"] >= 32768  # 128 MB: the case glibc maps afresh.
  # Some calls fault while the heap grows to its working size (a block freed
  # late, small blocks placed in a freed one: 6 of 60 calls in runs here); the
  # others find their pages mapped.
  reused = [n for n in kept["faults"] if n < 0.05 * kept["temp_pages"]]
  assert len(reused) >= 10, kept["faults"]
  # Without the settings every call faults through its whole temporary: the
  # figure above is the settings' doing.
  default = _probe("first", SIMPSONS_JAX_KEEP_MEMORY="0")
  assert default["set"] is False
  assert min(default["faults"][1:]) > 0.9 * default["temp_pages"]


@pytest.mark.slow
def test_importing_the_package_changes_nothing_and_a_late_call_refuses():
  late = _probe("late")  # import simpsons_jax; JAX runs; then the call.
  assert min(late["faults"][1:]) > 0.9 * late["temp_pages"]  # malloc as it was.
  assert late["set"] is False
  assert "came after JAX started" in late["log"]


def test_left_alone_where_jax_runs_on_an_accelerator():
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      "from simpsons_jax import host_memory; print(host_memory.keep_freed_memory())",
    ],
    env=os.environ | {"JAX_PLATFORMS": "tpu,cpu"},
    cwd=Path(__file__).resolve().parents[1],
    capture_output=True,
    text=True,
    check=True,
  )
  assert out.stdout.strip() == "False"
