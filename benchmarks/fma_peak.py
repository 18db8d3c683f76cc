"""The machine's float32 FMA peak, measured rather than taken from a data sheet.

  python benchmarks/fma_peak.py        # e.g. '425.7 GFLOP/s on 2 cores'

`fma_peak.c` is compiled for this CPU (`cc -march=native`, the widest vectors
it has) and runs independent chains of FMAs in registers on every core at
once: the rate no program can beat in float32 on this machine at its present
clock (AVX-512 may run slower than the nominal clock, turbo faster), which
`step_parts.py` divides its steps' FLOP rates by.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("fma_peak.c")


def measure() -> float | None:
  """GFLOP/s of all cores together, or None where no C compiler with
  OpenMP is found (the reason on stderr)."""
  compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
  if compiler is None:
    print("fma_peak: no C compiler (cc or $CC) to build fma_peak.c", file=sys.stderr)
    return None
  with tempfile.TemporaryDirectory() as folder:
    program = Path(folder) / "fma_peak"
    flags = ["-O2", "-march=native", "-fopenmp", "-ffp-contract=fast"]
    command = [compiler, *flags, str(SOURCE), "-o", str(program)]
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode:
      print(f"fma_peak: {compiler} failed: {built.stderr.strip()}", file=sys.stderr)
      return None
    out = subprocess.run([str(program)], capture_output=True, text=True, check=True)
  return float(out.stdout.split()[0])


if __name__ == "__main__":
  peak = measure()
  if peak is None:
    raise SystemExit(1)
  print(f"{peak:.1f} GFLOP/s on {os.cpu_count()} cores")
