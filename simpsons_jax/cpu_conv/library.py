"""The compiled kernels of `cpu_conv`: loading the extension and oneDNN's
runtime library and registering the FFI handlers with XLA:CPU (once), calling
a handler, the CPU they run on, and the variant of the direct kernels in use."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import platform
import re

import jax
import jax.numpy as jnp

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
