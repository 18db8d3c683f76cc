"""Where the notebook network's training step spends its time on CPU, part by part.

  python benchmarks/step_parts.py                       # 128 px, batch 64
  python benchmarks/step_parts.py --json=docs/results/step_parts_128.json

Each part runs alone, compiled, forward and backward as the training step runs
it (and its forward pass alone), in float32 and in bfloat16 (where
`cpu_conv.bfloat16()` allows it): the four conv + bias + ReLU + pool blocks
through `cpu_conv.conv_relu_pool` (the first on uint8 images, as the model
feeds it), the dense layers (dropout off; in bfloat16 through
`cpu_conv.dot_general`, as the model's) and Adam's update of every
parameter. Beside them, configs/full.py's whole training step on a batch of
the same size: what it spends beyond the parts is the rest (the loss, dropout,
the metrics, the glue between the parts). Each figure is the median of
`--repeats` calls after `simpsons_step.warm_up`, as in `speed.py`;
FLOPs count a multiply-add as two, forward and both gradients (the first
block has no input gradient). Inside the whole step, oneDNN's own account of
its convolutions (`ONEDNN_VERBOSE=profile_exec`, in a process of its own)
splits blocks 2-4 by pass: forward, input gradient, kernel gradient (the
median step's; block 1 is the direct kernels', not oneDNN's). The whole
step's FLOP rate is also given as a share of the machine's float32 FMA peak,
measured by `fma_peak.py`.
"""

from __future__ import annotations

import collections
import functools
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import fma_peak, results, simpsons_step  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 128, "Image size.")
flags.DEFINE_integer("batch", 64, "Batch size (configs/full.py's).")
flags.DEFINE_integer("repeats", 30, "Timed calls per part.")
flags.DEFINE_string("json", "", "Also write the results to this file.")
flags.DEFINE_enum(
  "profile_step", "", ["", "float32", "bfloat16"], "Internal: oneDNN's account."
)

CONV_FEATURES = (8, 16, 32, 64)
DENSE_FEATURES = (512, 512, 512, 512)
NUM_CLASSES = 13


def _milliseconds(f: Callable, *args) -> float:
  import jax

  simpsons_step.warm_up(lambda: jax.block_until_ready(f(*args)))
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def _parts(bfloat16: bool) -> list[dict]:
  """(name, GFLOP, ms) of every part in one precision."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from simpsons_jax import cpu_conv

  rng = np.random.default_rng(0)
  n, size, channels, parts = FLAGS.batch, FLAGS.size, 3, []
  shapes = []
  for i, features in enumerate(CONV_FEATURES):
    if i == 0:
      x = jnp.asarray(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    else:
      x = jnp.asarray(rng.standard_normal((n, size, size, channels), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, channels, features), np.float32) * 0.1)
    b = jnp.zeros(features)

    def block(k, b, x):
      return cpu_conv.conv_relu_pool(x, k, b, divisor=255.0, bfloat16=bfloat16).sum()

    grad = jax.jit(jax.grad(block, argnums=(0, 1) if i == 0 else (0, 1, 2)))
    passes = 2 if i == 0 else 3
    flops = 2 * n * size * size * 9 * channels * features * passes
    parts.append(
      dict(
        part=f"block {i + 1}: {size} px, {channels} -> {features}",
        gflop=flops / 1e9,
        ms=_milliseconds(grad, k, b, x),
        forward_ms=_milliseconds(jax.jit(block), k, b, x),
      )
    )
    shapes.append((channels, features))
    size, channels = size // 2, features
  width = size * size * channels
  # In bfloat16 through oneDNN's matrix product, as the model's.
  dot = functools.partial(cpu_conv.dot_general, bfloat16=True) if bfloat16 else None
  dense = nn.Sequential(
    [
      layer
      for features in DENSE_FEATURES
      for layer in (nn.Dense(features, dot_general=dot), nn.relu)
    ]
    + [nn.Dense(NUM_CLASSES, dot_general=dot)]
  )
  h = jnp.asarray(rng.standard_normal((n, width), np.float32))
  params = dense.init(jax.random.PRNGKey(0), h)
  forward = jax.jit(lambda p, h: dense.apply(p, h).sum())
  grad = jax.jit(jax.grad(lambda p, h: dense.apply(p, h).sum()))
  macs = sum(
    a * b
    for a, b in zip(
      (width, *DENSE_FEATURES), (*DENSE_FEATURES, NUM_CLASSES), strict=True
    )
  )
  parts.append(
    dict(
      part="dense layers",
      gflop=6 * n * macs / 1e9,
      ms=_milliseconds(grad, params, h),
      forward_ms=_milliseconds(forward, params, h),
    )
  )
  # Adam over every parameter of the network.
  every = [jnp.zeros((3, 3, c, f)) for c, f in shapes] + jax.tree.leaves(params)
  optimizer = optax.adam(1e-3)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(p, state, g):
    updates, state = optimizer.update(g, state, p)
    return optax.apply_updates(p, updates), state

  holder = [every, optimizer.init(every)]
  gradients = [jnp.ones_like(p) for p in every]

  def step():
    holder[0], holder[1] = update(holder[0], holder[1], gradients)
    return holder[0]

  parts.append(dict(part="Adam's update", gflop=0.0, ms=_milliseconds(step)))
  return parts


def _full_step(precision: str) -> Callable[[], None]:
  """configs/full.py's training step at `--size`, batch `--batch`."""
  from configs import full

  config = full.get_config()
  config.data.image_size = FLAGS.size
  config.train.dtype = precision
  return simpsons_step.prepared(config, "train", FLAGS.batch, NUM_CLASSES)[0]


PASSES = {
  "forward_training": "forward",
  "backward_data": "input gradient",
  "backward_weights": "kernel gradient",
}
WARM_UP_STEPS = 5


def _profiled_steps(precision: str) -> None:
  """The worker: the whole step `WARM_UP_STEPS + --repeats` times, oneDNN
  printing each convolution it runs; then the number of steps."""
  step = _full_step(precision)
  for _ in range(WARM_UP_STEPS + FLAGS.repeats):
    step()
  print(f"steps {WARM_UP_STEPS + FLAGS.repeats}", flush=True)


def _onednn_passes(precision: str) -> list[dict]:
  """Per oneDNN block of the whole step, the median step's ms in each pass."""
  done = subprocess.run(
    [
      sys.executable,
      __file__,
      f"--size={FLAGS.size}",
      f"--batch={FLAGS.batch}",
      f"--repeats={FLAGS.repeats}",
      f"--profile_step={precision}",
    ],
    env={**os.environ, "ONEDNN_VERBOSE": "profile_exec"},
    capture_output=True,
    text=True,
    check=True,
  )
  steps = int(re.search(r"^steps (\d+)$", done.stdout, re.M)[1])
  blocks = {  # The network's oneDNN blocks (not the library's self-check).
    (CONV_FEATURES[i - 1], features, FLAGS.size >> i): f"block {i + 1}"
    for i, features in enumerate(CONV_FEATURES[1:], start=1)
  }
  calls = []
  for line in done.stdout.splitlines():
    if line.startswith("onednn_verbose,exec,cpu,convolution,"):
      call = line.split(",")
      shape = re.search(r"ic(\d+)oc(\d+)_ih(\d+)", call[-2]).groups()
      if tuple(map(int, shape)) in blocks:
        calls.append((blocks[tuple(map(int, shape))], shape, call))
  per_step = len(calls) // steps
  if per_step * steps != len(calls):
    raise RuntimeError(f"{len(calls)} convolutions in {steps} steps: not as many each")
  ms = collections.defaultdict(list)
  for i in range(WARM_UP_STEPS, steps):
    one = collections.Counter()
    for block, (ic, oc, ih), call in calls[i * per_step : (i + 1) * per_step]:
      one[f"{block}: {ih} px, {ic} -> {oc}", PASSES[call[5]]] += float(call[-1])
    for key, value in one.items():
      ms[key].append(value)
  return [
    {"part": b, **{p: statistics.median(ms[b, p]) for p in PASSES.values()}}
    for b in sorted({block for block, _ in ms})
  ]


def main(argv: list[str]) -> None:
  del argv
  from simpsons_jax import host_memory

  host_memory.keep_freed_memory()  # As main.py does, before JAX runs.
  if FLAGS.profile_step:
    return _profiled_steps(FLAGS.profile_step)
  from simpsons_jax import cpu_conv

  if not cpu_conv.available()[0]:
    raise SystemExit(f"oneDNN's kernels are not used here: {cpu_conv.available()[1]}")
  precisions = ["float32"] + (["bfloat16"] if cpu_conv.bfloat16()[0] else [])
  peak = fma_peak.measure()  # Before JAX's threads start.
  rows = {p: _parts(p == "bfloat16") for p in precisions}
  steps = {p: _milliseconds(_full_step(p)) for p in precisions}
  passes = {p: _onednn_passes(p) for p in precisions}
  print(f"{FLAGS.size} px, batch {FLAGS.batch}, on {cpu_conv.cpu_description()}")
  for precision, parts in rows.items():
    total = sum(p["ms"] for p in parts)
    rate = sum(p["gflop"] for p in parts) / steps[precision] * 1e3
    share = f", {rate / peak:.0%} of the FMA peak ({peak:.0f})" if peak else ""
    print(
      f"\n{precision}: {total:.1f} ms for the parts, "
      f"{steps[precision]:.1f} ms for the whole step: {rate:.0f} GFLOP/s{share}"
    )
    for p in parts:
      rate = f"{p['gflop'] / p['ms'] * 1e3:.0f} GFLOP/s" if p["gflop"] else ""
      forward = f"(forward {p['forward_ms']:.2f})" if "forward_ms" in p else ""
      print(f"  {p['part']:32} {p['ms']:7.2f} ms {forward:18} {rate}")
    print("  oneDNN in the whole step, ms:")
    for block in passes[precision]:
      said = ", ".join(f"{p} {block[p]:.2f}" for p in PASSES.values())
      print(f"    {block['part']:30} {said}")
  if FLAGS.json:
    results.write(
      FLAGS.json,
      "step_parts",
      {
        "size": FLAGS.size,
        "batch": FLAGS.batch,
        "repeats": FLAGS.repeats,
        "parts": rows,
        "whole_step_ms": steps,
        "fma_peak_gflops": peak,
        "onednn_passes_ms": passes,
      },
    )


if __name__ == "__main__":
  app.run(main)
