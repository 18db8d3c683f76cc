"""The compiled kernels of `cpu_conv` and their JAX bindings: loading the
extension and oneDNN's runtime library and registering the FFI handlers with
XLA:CPU (once), the CPU they run on and the variant of the direct kernels in
use; `call` calls one handler, and the operations below tie each forward
handler to the handlers of its gradients with a `jax.custom_vjp` (the
convolution, the notebook network's fused block of conv + bias, ReLU and 2x2
max pool, the pool alone and the dense layer's product; with `bfloat16`, of
operands rounded to bfloat16). The operations call the handlers
unconditionally: `cpu_conv`'s public functions decide where they run
(`available()`, `bfloat16()`) and fall back to `lax`."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import platform
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_EXTENSION = "simpsons_jax.cpu_conv._onednn"
_RUNTIME = "onednn-cpu-gomp"
TARGETS = {
  "forward": "OnednnConvForward",
  "backward_data": "OnednnConvBackwardData",
  "backward_weights": "OnednnConvBackwardWeights",
  "backward_weights_bias": "OnednnConvBackwardWeightsBias",
  "conv_relu_pool_forward": "ConvBiasReluPoolForward",
  "conv_relu_pool_forward_u8": "ConvBiasReluPoolForwardU8",
  "conv_relu_pool_backward_u8": "ConvBiasReluPoolBackwardU8",
  "relu_pool_forward": "ReluMaxPoolForward",
  "relu_pool_backward": "ReluMaxPoolBackward",
  "matmul": "OnednnMatmul",
}
# The convolutions that also take bfloat16 operands (float32 results and
# accumulation): `kind + "_bf16"`.
TARGETS.update(
  {
    f"{kind}_bf16": f"{TARGETS[kind]}Bf16"
    for kind in (
      "forward",
      "backward_data",
      "backward_weights",
      "backward_weights_bias",
      "conv_relu_pool_forward",
      "matmul",
    )
  }
)
# The pool's gradient written rounded to bfloat16 (for the convolutions' own).
TARGETS["relu_pool_backward_to_bf16"] = "ReluMaxPoolBackwardBf16"
# oneDNN's dnnl_cpu_isa_avx512_core_bf16 bits: an instruction set that holds
# them computes bfloat16 dot products in hardware (AVX512_BF16, AMX).
_ISA_BF16 = 0xE7


class _Version(ctypes.Structure):
  _fields_ = [
    ("major", ctypes.c_int),
    ("minor", ctypes.c_int),
    ("patch", ctypes.c_int),
    ("hash", ctypes.c_char_p),
    ("cpu_runtime", ctypes.c_uint),
    ("gpu_runtime", ctypes.c_uint),
  ]


def cpu_description() -> str:
  """The CPU's model name and the vector extensions that decide oneDNN's
  kernels, e.g. 'AMD EPYC (avx2, avx512)', and any limit set on them through
  the environment (ONEDNN_MAX_CPU_ISA, XLA's --xla_cpu_max_isa)."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  extensions = [
    name
    for name, flag in (("avx2", "avx2"), ("avx512", "avx512f"), ("amx", "amx_tile"))
    if flag in flags
  ]
  limits = re.findall(r"--xla_cpu_max_isa=\S+", os.environ.get("XLA_FLAGS", ""))
  if os.environ.get("ONEDNN_MAX_CPU_ISA"):
    limits.insert(0, f"oneDNN at most {os.environ['ONEDNN_MAX_CPU_ISA']}")
  return f"{model} ({', '.join(extensions + limits) or 'no avx2'})"


def _runtime_library() -> str:
  """The path of libdnnl.so.3 from the oneDNN runtime wheel."""
  files = importlib.metadata.distribution(_RUNTIME).files or []
  for file in files:
    if file.name == "libdnnl.so.3":
      return str(file.locate())
  raise FileNotFoundError(f"{_RUNTIME} has no libdnnl.so.3")


# The direct kernels' compiled variants, best first (onednn_conv.cc numbers
# them 2, 1, 0).
KERNEL_VARIANTS = ("x86-64-v4", "x86-64-v3", "baseline")


# onednn_conv.cc's SimpsonsUseKernelVariant and oneDNN's library, once loaded.
_use_variant = None
_dnnl = None


@functools.cache
def load() -> tuple[bool, str]:
  """(True, oneDNN's version) once the kernels are registered with XLA:CPU, or
  (False, why not). Loads and registers on the first call only."""
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    return (
      False,
      f"built for x86-64 Linux only, not {platform.system()} {platform.machine()}",
    )
  spec = importlib.util.find_spec(_EXTENSION)
  if spec is None or spec.origin is None:
    return (
      False,
      "the extension was not built at install (`pip install -v -e .` says why)",
    )
  try:
    dnnl = ctypes.CDLL(_runtime_library(), mode=ctypes.RTLD_GLOBAL)
    library = ctypes.CDLL(spec.origin)
  except (OSError, importlib.metadata.PackageNotFoundError) as e:
    return False, f"oneDNN could not be loaded ({e})"
  for target in TARGETS.values():
    jax.ffi.register_ffi_target(
      target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu"
    )
  dnnl.dnnl_version.restype = ctypes.POINTER(_Version)
  v = dnnl.dnnl_version().contents
  global _use_variant, _dnnl
  _use_variant, _dnnl = library.SimpsonsUseKernelVariant, dnnl
  return True, f"oneDNN {v.major}.{v.minor}.{v.patch}"


def kernel_variants_here() -> tuple[str, ...]:
  """The direct kernels' variants this CPU runs, best first ('x86-64-v4',
  'x86-64-v3', 'baseline'); none where the kernels did not load."""
  if not load()[0]:
    return ()
  previous = _use_variant(-1)
  _use_variant(2)
  best = _use_variant(-1)
  _use_variant(previous)
  return KERNEL_VARIANTS[len(KERNEL_VARIANTS) - 1 - best :]


def use_kernel_variant(variant: str | None) -> str | None:
  """Runs the direct kernels' `variant` (one of `kernel_variants_here()`), or
  the best this CPU runs for None, from the next call on; returns the variant
  set before (None where that was the best). Convolutions already compiled
  follow too: the choice is made at each call."""
  if not load()[0]:
    raise RuntimeError(f"oneDNN's convolutions are unavailable here: {load()[1]}.")
  here = kernel_variants_here()
  if variant is not None and variant not in here:
    raise ValueError(f"this CPU runs the kernel variants {here}, not {variant!r}")
  previous = _use_variant(-1)
  _use_variant(
    2 if variant is None else len(KERNEL_VARIANTS) - 1 - KERNEL_VARIANTS.index(variant)
  )
  name = KERNEL_VARIANTS[len(KERNEL_VARIANTS) - 1 - previous]
  return None if name == here[0] else name


def bfloat16_instructions() -> bool:
  """Whether oneDNN runs bfloat16 dot products in hardware here (AVX512_BF16
  or AMX, within any ONEDNN_MAX_CPU_ISA cap); False where the kernels did not
  load. Without them oneDNN emulates bfloat16, slower than float32."""
  if not load()[0]:
    return False
  return (_dnnl.dnnl_get_effective_cpu_isa() & _ISA_BF16) == _ISA_BF16


def call(kind: str, out_shape, *operands: jax.Array, geometry=None, **attributes):
  """Calls one FFI handler (its bfloat16 twin for bfloat16 operands);
  `out_shape` is one ShapeDtypeStruct or a tuple."""
  loaded, why = load()  # Registers the handlers on first use.
  if not loaded:
    raise RuntimeError(f"oneDNN's convolutions are unavailable here: {why}.")
  if operands[0].dtype == jnp.bfloat16:
    kind += "_bf16"
  if geometry is not None:
    stride_h, stride_w, (pad_top, pad_bottom), (pad_left, pad_right) = geometry
    attributes.update(
      stride_h=stride_h,
      stride_w=stride_w,
      pad_top=pad_top,
      pad_bottom=pad_bottom,
      pad_left=pad_left,
      pad_right=pad_right,
    )
  return jax.ffi.ffi_call(TARGETS[kind], out_shape)(*operands, **attributes)


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(
  x: jax.Array, kernel: jax.Array, geometry: tuple, bfloat16: bool = False
) -> jax.Array:
  """x * kernel in float32; with `bfloat16`, of the operands rounded to
  bfloat16 (accumulated in float32), the gradients taking the output's
  gradient rounded to bfloat16 too."""
  return _conv_forward(x, kernel, geometry, bfloat16)[0]


def _output_shape(x: jax.Array, kernel: jax.Array, geometry) -> tuple[int, ...]:
  stride_h, stride_w, (top, bottom), (left, right) = geometry
  n, h, w, _ = x.shape
  kh, kw, _, features = kernel.shape
  return (
    n,
    (h + top + bottom - kh) // stride_h + 1,
    (w + left + right - kw) // stride_w + 1,
    features,
  )


def _conv_forward(x, kernel, geometry, bfloat16):
  if bfloat16:  # The rounded operands are kept for the gradients.
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  y = call(
    "forward", _f32(*_output_shape(x, kernel, geometry)), x, kernel, geometry=geometry
  )
  return y, (x, kernel)


def _conv_backward(geometry, bfloat16, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  dx = call("backward_data", _f32(*x.shape), dy, kernel, geometry=geometry)
  dkernel = call("backward_weights", _f32(*kernel.shape), x, dy, geometry=geometry)
  return dx, dkernel


conv.defvjp(_conv_forward, _conv_backward)


def conv_geometry(
  shape: Sequence[int],
  kernel_shape: Sequence[int],
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
) -> tuple:
  """The attributes the handlers take for a convolution of NHWC `shape` with
  HWIO `kernel_shape`: (stride_h, stride_w, (top, bottom), (left, right)),
  'SAME' and 'VALID' padding resolved as `lax` resolves them."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(shape[1:3], kernel_shape[:2], window_strides, padding)
  return (
    int(window_strides[0]),
    int(window_strides[1]),
    tuple(int(p) for p in padding[0]),
    tuple(int(p) for p in padding[1]),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def conv_relu_pool(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  geometry: tuple,
  divisor: float,
  bfloat16: bool,
) -> jax.Array:
  """ReLU and a 2x2 max pool of x * kernel + bias; uint8 `x` is read as
  x / divisor and gets no gradient; with `bfloat16` as `conv`."""
  return _conv_relu_pool_forward(x, kernel, bias, geometry, divisor, bfloat16)[0]


def _conv_relu_pool_forward(x, kernel, bias, geometry, divisor, bfloat16):
  n, h, w, c = _output_shape(x, kernel, geometry)
  pooled = (n, h // 2, w // 2, c)
  outputs = (_f32(*pooled), jax.ShapeDtypeStruct(pooled, jnp.int8))
  if x.dtype == jnp.uint8:
    y, code = call(
      "conv_relu_pool_forward_u8",
      outputs,
      x,
      kernel,
      bias,
      geometry=geometry,
      divisor=np.float32(divisor),
    )
    return y, (x, kernel, code, (n, h, w, c))
  if bfloat16:  # The rounded operands are kept for the gradients.
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  y, code = call("conv_relu_pool_forward", outputs, x, kernel, bias, geometry=geometry)
  return y, (x, kernel, code, (n, h, w, c))


def _conv_relu_pool_backward(geometry, divisor, bfloat16, residuals, g):
  x, kernel, code, y_shape = residuals
  images = x.dtype == jnp.uint8
  gradients = (_f32(*kernel.shape), _f32(kernel.shape[-1]))
  if images and kernel.shape[:2] == (3, 3):
    # The first block: the convolution's gradient never leaves the kernel.
    dkernel, dbias = call(
      "conv_relu_pool_backward_u8",
      gradients,
      x,
      code,
      g,
      geometry=geometry,
      divisor=np.float32(divisor),
    )
    return None, dkernel, dbias
  if bfloat16:  # Rounded as the pool's gradient is written.
    bf16 = jax.ShapeDtypeStruct(y_shape, jnp.bfloat16)
    dy = call("relu_pool_backward_to_bf16", bf16, code, g)
  else:
    dy = call("relu_pool_backward", _f32(*y_shape), code, g)
  dkernel, dbias = call(
    "backward_weights_bias",
    gradients,
    x.astype(jnp.float32) / divisor if images else x,
    dy,
    geometry=geometry,
  )
  if images:  # Images have no gradient.
    return None, dkernel, dbias
  dx = call("backward_data", _f32(*x.shape), dy, kernel, geometry=geometry)
  return dx, dkernel, dbias


conv_relu_pool.defvjp(_conv_relu_pool_forward, _conv_relu_pool_backward)


@jax.custom_vjp
def relu_pool(x: jax.Array) -> jax.Array:
  """ReLU and a 2x2 max pool of float32 NHWC `x`."""
  return _relu_pool_forward(x)[0]


def _relu_pool_forward(x):
  n, h, w, c = x.shape
  pooled = (n, h // 2, w // 2, c)
  y, code = call(
    "relu_pool_forward", (_f32(*pooled), jax.ShapeDtypeStruct(pooled, jnp.int8)), x
  )
  return y, (code, x.shape)


def _relu_pool_backward(residuals, g):
  code, shape = residuals
  return (call("relu_pool_backward", _f32(*shape), code, g),)


relu_pool.defvjp(_relu_pool_forward, _relu_pool_backward)


def _matmul(a: jax.Array, b: jax.Array, transpose_a=False, transpose_b=False):
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  return call(
    "matmul", _f32(m, n), a, b, transpose_a=transpose_a, transpose_b=transpose_b
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, kernel: jax.Array, bfloat16: bool) -> jax.Array:
  """x @ kernel in float32; with `bfloat16` as `conv`."""
  return _dense_forward(x, kernel, bfloat16)[0]


def _dense_forward(x, kernel, bfloat16):
  if bfloat16:  # The rounded operands are kept for the gradients.
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  return _matmul(x, kernel), (x, kernel)


def _dense_backward(bfloat16, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  return _matmul(dy, kernel, transpose_b=True), _matmul(x, dy, transpose_a=True)


dense.defvjp(_dense_forward, _dense_backward)
