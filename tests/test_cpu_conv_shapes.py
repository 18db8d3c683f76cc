"""cpu_conv over the whole shape space, on every instruction set it can take.

A few hundred seeded random convolutions, fused blocks and matrix products
(forward, input, kernel and bias gradients) are compared with the plain
formulation written out in float64 NumPy (`cpu_conv.self_check`: a sum over
the kernel's offsets of strided slices; the pool's gradient to each window's
positive maximum, split between ties; the products): it runs in milliseconds,
where `lax`'s own convolutions take many seconds to compile for 200 shapes
(`test_cpu_conv.py` compares with them on chosen cases).
All cases run through `cpu_conv` in one compiled function.

oneDNN picks its implementation for the CPU and for the `ONEDNN_MAX_CPU_ISA`
cap it reads when it loads, so each cap this CPU allows runs the cases in a
process of its own; the direct kernels' compiled variants are switched within
one process (`cpu_conv.use_kernel_variant`).
"""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import lax

from simpsons_jax import cpu_conv
from simpsons_jax.cpu_conv.self_check import (
  close,
  plain_block,
  plain_conv,
  plain_dense,
  rounded,
)

NHWC = ("NHWC", "HWIO", "NHWC")
ROOT = Path(__file__).resolve().parents[1]
CONV_CASES, BLOCK_CASES, DENSE_CASES = 200, 60, 60


def _padding(rng: np.random.Generator, kernel: int) -> str | list[list[int]]:
  padding = str(rng.choice(["SAME", "VALID", "explicit"]))
  if padding != "explicit":
    return padding
  return rng.integers(0, kernel, (2, 2)).tolist()  # Asymmetric, often.


def conv_cases(count: int, seed: int = 0) -> list[dict]:
  """Seeded convolutions: input channels 1-9 and a few wide ones, outputs 1-17
  and a few multiples of 8 (the direct kernels' case), kernels 1/3/5, strides
  1/2 on each axis, SAME, VALID and explicit padding, odd sizes, batches 1-5."""
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(count):
    kernel = int(rng.choice([1, 3, 5]))
    cases.append(
      dict(
        shape=[
          int(rng.integers(1, 6)),
          int(rng.integers(kernel, 14)),
          int(rng.integers(kernel, 14)),
          int(rng.choice([*range(1, 10), 12, 16, 33])),
        ],
        kernel=[kernel, kernel],
        strides=[int(rng.integers(1, 3)), int(rng.integers(1, 3))],
        padding=_padding(rng, kernel),
        features=int(rng.choice([*range(1, 18), 8, 16, 24])),
      )
    )
  return cases


def block_cases(count: int, seed: int = 1) -> list[dict]:
  """Seeded conv + bias, ReLU and 2x2 pool blocks (stride 1) on float or uint8
  images: the direct kernels (at most 4 channels, outputs in 8s) and oneDNN."""
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(count):
    kernel = int(rng.choice([1, 3, 3, 5]))
    cases.append(
      dict(
        shape=[
          int(rng.integers(1, 6)),
          int(rng.integers(kernel + 1, 20)),
          int(rng.integers(kernel + 1, 20)),
          int(rng.choice([1, 2, 3, 4, 5, 8])),
        ],
        kernel=[kernel, kernel],
        strides=[1, 1],
        padding=_padding(rng, kernel),
        features=int(rng.choice([8, 16, 24, 5, 12])),
        uint8=bool(rng.integers(0, 2)),
      )
    )
  # The planar first block (uint8 images, 3x3 kernels) works in runs of 32
  # pixels (16 pooled) of a row: each channel count, full runs and tails,
  # odd widths and heights, asymmetric padding.
  planar = [(1, 8, 67, "SAME"), (2, 16, 33, "VALID"), (3, 8, 128, "SAME")]
  planar += [(4, 24, 45, [[0, 2], [2, 0]]), (3, 16, 64, [[2, 1], [1, 2]])]
  for channels, features, width, padding in planar[: max(0, count)]:
    cases.append(
      dict(
        shape=[2, 9, width, channels],
        kernel=[3, 3],
        strides=[1, 1],
        padding=padding,
        features=features,
        uint8=True,
      )
    )
  return cases


def dense_cases(count: int, seed: int = 2) -> list[dict]:
  """Seeded (M, K) by (K, N) products, a dense layer's: batches 1-70, inputs
  1-300 and outputs 1-80 (odd sizes, 1 and powers of two among them), and the
  notebook network's widest (64 by 4096 by 512) once."""
  rng = np.random.default_rng(seed)

  def sizes(high: int) -> int:
    if rng.random() < 0.3:
      return int(rng.choice([1, 2, 16, 64]))
    return int(rng.integers(1, high + 1))

  cases = [dict(dense=[sizes(70), sizes(300), sizes(80)]) for _ in range(count)]
  return cases + [dict(dense=[64, 4096, 512])][: max(0, count)]


def _dense_operands(case: dict) -> tuple[np.ndarray, ...]:
  """The case's input, kernel and output gradient, seeded by the case."""
  rng = np.random.default_rng(zlib.crc32(json.dumps(case).encode()))
  m, k, n = case["dense"]
  return tuple(
    rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (m, n))
  )


def _pads(case: dict) -> list[tuple[int, int]]:
  if isinstance(case["padding"], str):
    return lax.padtype_to_pads(
      case["shape"][1:3], case["kernel"], case["strides"], case["padding"]
    )
  return [tuple(p) for p in case["padding"]]


def _operands(case: dict, block: bool) -> tuple[np.ndarray, ...]:
  """The case's input, kernel, bias and output gradient, seeded by the case."""
  rng = np.random.default_rng(zlib.crc32(json.dumps(case, sort_keys=True).encode()))
  if case.get("uint8"):
    x = rng.integers(0, 256, case["shape"], dtype=np.uint8)
  else:
    x = rng.standard_normal(case["shape"]).astype(np.float32)
  k = rng.standard_normal((*case["kernel"], case["shape"][-1], case["features"]))
  b = rng.standard_normal(case["features"])
  (top, bottom), (left, right) = _pads(case)
  oh = (case["shape"][1] + top + bottom - case["kernel"][0]) // case["strides"][0] + 1
  ow = (case["shape"][2] + left + right - case["kernel"][1]) // case["strides"][1] + 1
  if block:  # The gradient of the pooled output.
    oh, ow = oh // 2, ow // 2
  g = rng.standard_normal((case["shape"][0], oh, ow, case["features"]))
  return x, k.astype(np.float32), b.astype(np.float32), g.astype(np.float32)


def _direct(case: dict) -> bool:
  """Whether the block runs as the direct convolution (float32 always)."""
  return case["shape"][-1] <= 4 and case["features"] % 8 == 0


def _ours(
  convs: list[dict], blocks: list[dict], denses: list[dict], bfloat16: bool = False
) -> list[tuple]:
  """cpu_conv's value and gradients for every case, from one compiled function:
  (y, dx, dk) for a convolution or a product, (y, dx or None, dk, db) for a
  block; with `bfloat16`, through the bfloat16 kernels."""

  def conv(case, x, k, g):
    y, vjp = jax.vjp(
      lambda x, k: cpu_conv.conv_general_dilated(
        x, k, case["strides"], _pads(case), dimension_numbers=NHWC, bfloat16=bfloat16
      ),
      x,
      k,
    )
    return (y, *vjp(g))

  def block(case, x, k, b, g):
    def f(x, k, b):
      return cpu_conv.conv_relu_pool(
        x, k, b, padding=_pads(case), divisor=255.0, bfloat16=bfloat16
      )

    if case["uint8"]:  # Images get no gradient.
      y, vjp = jax.vjp(lambda k, b: f(x, k, b), k, b)
      return (y, None, *vjp(g))
    y, vjp = jax.vjp(f, x, k, b)
    return (y, *vjp(g))

  def dense(x, k, g):
    y, vjp = jax.vjp(
      lambda x, k: cpu_conv.dot_general(
        x, k, (((1,), (0,)), ((), ())), bfloat16=bfloat16
      ),
      x,
      k,
    )
    return (y, *vjp(g))

  def all_cases(conv_operands, block_operands, dense_operands):
    outputs = [
      conv(c, x, k, g) for c, (x, k, _, g) in zip(convs, conv_operands, strict=True)
    ]
    outputs += [block(c, *o) for c, o in zip(blocks, block_operands, strict=True)]
    return outputs + [dense(*o) for o in dense_operands]

  operands = (
    [_operands(c, block=False) for c in convs],
    [_operands(c, block=True) for c in blocks],
    [_dense_operands(c) for c in denses],
  )
  return jax.device_get(jax.jit(all_cases)(*operands))


def shape_space_failures(
  conv_count: int, block_count: int, dense_count: int, bfloat16: bool = False
) -> list[str]:
  """One line for each case whose value or gradients differ from the plain
  formulation's (with `bfloat16`, of the operands rounded to bfloat16, the
  direct convolution's blocks excepted), naming the case and what differs."""
  convs, blocks = conv_cases(conv_count), block_cases(block_count)
  denses = dense_cases(dense_count)
  outputs = _ours(convs, blocks, denses, bfloat16)
  names = ("forward", "input gradient", "kernel gradient", "bias gradient")
  operand = rounded if bfloat16 else np.asarray
  failures = []
  for case, ours in zip(convs + blocks + denses, outputs, strict=True):
    if "dense" in case:
      expected = plain_dense(*(operand(a) for a in _dense_operands(case)))
    elif "uint8" in case:
      x, k, b, g = _operands(case, block=True)
      rounding = bfloat16 and not _direct(case)
      expected = plain_block(x, k, b, _pads(case), g, 255.0, rounding)
    else:
      x, k, _, g = _operands(case, block=False)
      expected = plain_conv(
        operand(x), operand(k), case["strides"], _pads(case), operand(g)
      )
    wrong = [
      name
      for name, got, want in zip(names, ours, expected, strict=False)
      if not close(got, want)
    ]
    if wrong:
      kind = ("bfloat16 " if bfloat16 else "") + (
        "product" if "dense" in case else "block" if "uint8" in case else "conv"
      )
      failures.append(f"{kind} {json.dumps(case)}: {', '.join(wrong)}")
  return failures


def _needs_kernels():
  if not cpu_conv.available()[0]:
    pytest.skip(cpu_conv.available()[1])


def test_the_cases_cover_the_shape_space():
  cases = conv_cases(CONV_CASES)
  assert {c["shape"][-1] for c in cases} >= {*range(1, 10), 12, 16, 33}
  assert {c["features"] for c in cases} >= set(range(1, 18))
  assert {c["kernel"][0] for c in cases} == {1, 3, 5}
  assert {s for c in cases for s in c["strides"]} == {1, 2}
  assert {c["shape"][0] for c in cases} == {1, 2, 3, 4, 5}
  paddings = [c["padding"] for c in cases]
  assert {"SAME", "VALID"} <= {p for p in paddings if isinstance(p, str)}
  assert any(isinstance(p, list) and p[0][0] != p[0][1] for p in paddings)
  blocks = block_cases(BLOCK_CASES)
  direct = [c for c in blocks if _direct(c)]
  assert {c["uint8"] for c in direct} == {True, False}
  planar = [c for c in direct if c["uint8"] and c["kernel"][0] == 3]
  assert {c["shape"][-1] for c in planar} == {1, 2, 3, 4}
  assert any(c["shape"][2] > 64 for c in planar)  # Over two runs of 32.
  assert any(c["shape"][-1] > 4 or c["features"] % 8 for c in blocks)
  sizes = np.array([c["dense"] for c in dense_cases(DENSE_CASES)])
  for axis, high in enumerate((70, 300, 80)):  # M, K, N
    assert 1 in sizes[:, axis] and 64 in sizes[:, axis]
    assert (sizes[:, axis] % 2 == 1).sum() > 10 and sizes[:, axis].max() > high // 2


def test_the_plain_formulation_is_lax_on_a_case():
  # The reference itself, against lax and autodiff.
  case = conv_cases(1, seed=3)[0] | dict(strides=[2, 1], padding=[[1, 0], [2, 1]])
  x, k, _, g = _operands(case, block=False)

  def f(x, k):
    return lax.conv_general_dilated(x, k, (2, 1), _pads(case), dimension_numbers=NHWC)

  y, vjp = jax.vjp(f, x, k)
  for got, want in zip(
    plain_conv(x, k, (2, 1), _pads(case), g), (y, *vjp(g)), strict=True
  ):
    np.testing.assert_allclose(
      got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max())
    )
  x, k, g = _dense_operands(dict(dense=[5, 7, 3]))
  y, vjp = jax.vjp(lambda x, k: x @ k, x, k)
  for got, want in zip(plain_dense(x, k, g), (y, *vjp(g)), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["best", *cpu_conv.KERNEL_VARIANTS])
def test_the_shape_space_with_each_direct_kernel_variant(variant):
  # The direct kernels are compiled for x86-64-v4 (AVX-512), v3 (AVX2) and the
  # x86-64 baseline: the CPU picks the best, the override any below it.
  _needs_kernels()
  if variant != "best" and variant not in cpu_conv.kernel_variants_here():
    pytest.skip(f"this CPU cannot run the {variant} kernels")
  previous = cpu_conv.use_kernel_variant(None if variant == "best" else variant)
  try:
    # The convolutions with oneDNN once; the blocks (the direct kernels' and
    # the pool's users) with every variant.
    # The products with oneDNN once too.
    best = variant == "best"
    failures = shape_space_failures(
      CONV_CASES if best else 0, BLOCK_CASES, DENSE_CASES if best else 0
    )
  finally:
    cpu_conv.use_kernel_variant(previous)
  assert not failures, "\n".join(failures)


# The ONEDNN_MAX_CPU_ISA caps, the CPU flags each needs, and whether oneDNN
# computes bfloat16 dot products in hardware under it.
ONEDNN_CAPS = {
  "SSE41": ((), False),
  "AVX2": (("avx2",), False),
  "AVX512_CORE": (("avx512bw",), False),
  "AVX512_CORE_BF16": (("avx512bw", "avx512_bf16"), True),
  "AVX512_CORE_AMX": (("avx512bw", "amx_bf16", "amx_tile"), True),
}


def onednn_caps_here() -> list[str]:
  """The ONEDNN_MAX_CPU_ISA caps at or below this CPU's instruction sets."""
  cpuinfo = Path("/proc/cpuinfo")
  flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
  return [cap for cap, (needs, _) in ONEDNN_CAPS.items() if flags.issuperset(needs)]


@pytest.mark.slow
def test_the_shape_space_in_bfloat16():
  # The bfloat16 kernels on this CPU's best instruction set (the caps below
  # take each in turn): the plain formulation of the rounded operands.
  _needs_kernels()
  if not cpu_conv.bfloat16()[0]:
    pytest.skip(cpu_conv.bfloat16()[1])
  failures = shape_space_failures(CONV_CASES, BLOCK_CASES, DENSE_CASES, bfloat16=True)
  assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("cap", list(ONEDNN_CAPS))
def test_the_shape_space_under_each_onednn_isa_cap(cap, tmp_path):
  # oneDNN reads its cap once, when it loads: a process of its own for each.
  # Two OpenMP threads at least: some of oneDNN's faults need more than one.
  # Where the cap has bfloat16 dot products the bfloat16 kernels run the
  # shape space too; below it they are not used (float32 instead).
  _needs_kernels()
  if cap not in onednn_caps_here():
    pytest.skip(f"this CPU does not reach {cap}")
  out = tmp_path / "failures.json"
  script = (
    "import json, sys\n"
    "from simpsons_jax import cpu_conv\n"
    "from tests.test_cpu_conv_shapes import shape_space_failures\n"
    "assert cpu_conv.available()[0], cpu_conv.available()[1]\n"
    "bf16 = cpu_conv.bfloat16()[0]\n"
    "counts = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])\n"
    "failures = shape_space_failures(*counts)\n"
    "failures += shape_space_failures(*counts, bfloat16=True) if bf16 else []\n"
    "json.dump({'bfloat16': bf16, 'failures': failures}, open(sys.argv[1], 'w'))\n"
  )
  env = {
    **os.environ,
    "ONEDNN_MAX_CPU_ISA": cap,
    "XLA_FLAGS": "",
    "OMP_NUM_THREADS": "2",
  }
  subprocess.run(
    [
      sys.executable,
      "-c",
      script,
      out,
      *map(str, (CONV_CASES, BLOCK_CASES, DENSE_CASES)),
    ],
    cwd=ROOT,
    env=env,
    check=True,
    timeout=600,
  )
  result = json.loads(out.read_text())
  assert result["bfloat16"] == ONEDNN_CAPS[cap][1]
  assert not result["failures"], f"under ONEDNN_MAX_CPU_ISA={cap}:\n" + "\n".join(
    result["failures"]
  )


@pytest.mark.parametrize("variant", cpu_conv.KERNEL_VARIANTS)
def test_the_pools_bfloat16_gradient_is_its_float32_gradient_rounded(variant):
  # The pool's gradient written as bfloat16 (the bfloat16 blocks' input to
  # their two backward convolutions) equals XLA's rounding of the float32 one,
  # bit for bit: ties to even, NaN, infinities, zeros, subnormals, channels
  # past the last vector of 8, odd edges.
  _needs_kernels()
  if variant not in cpu_conv.kernel_variants_here():
    pytest.skip(f"this CPU cannot run the {variant} kernels")
  rng = np.random.default_rng(5)
  shape = (2, 7, 9, 11)  # Odd rows and columns; 11 = 8 + a tail of 3.
  pooled = (2, 3, 4, 11)
  code = rng.integers(0, 16, pooled).astype(np.int8)
  g = rng.standard_normal(pooled).astype(np.float32)
  special = np.array(
    [
      1 + 2**-8,
      1 + 3 * 2**-8,
      -(1 + 2**-8),
      np.nan,
      np.inf,
      -np.inf,
      -0.0,
      1e-40,
      -3e-39,
      3.4e38,
      2**-126,
      1 + 2**-9,
    ],
    np.float32,
  )
  n = special.size
  g.reshape(-1)[:n], code.reshape(-1)[:n] = special, 1  # All to one position.
  with np.errstate(over="ignore"):
    g.reshape(-1)[n : 2 * n] = special * 3
  code.reshape(-1)[n : 2 * n] = 7  # Split between three ties.
  previous = cpu_conv.use_kernel_variant(variant)
  try:
    as_float = cpu_conv.library.call(
      "relu_pool_backward", jax.ShapeDtypeStruct(shape, np.float32), code, g
    )
    as_bf16 = cpu_conv.library.call(
      "relu_pool_backward_to_bf16",
      jax.ShapeDtypeStruct(shape, jax.numpy.bfloat16),
      code,
      g,
    )
  finally:
    cpu_conv.use_kernel_variant(previous)
  want = np.asarray(as_float.astype(jax.numpy.bfloat16)).view(np.uint16)
  got = np.asarray(as_bf16).view(np.uint16)
  nan = np.isnan(np.asarray(as_float))
  assert nan.any() and np.isnan(np.asarray(as_bf16, np.float32))[nan].all()
  np.testing.assert_array_equal(got[~nan], want[~nan])
  truncated = np.asarray(as_float).view(np.uint32) >> 16
  assert (got[~nan] != truncated[~nan]).any()  # The cases round.
