"""What machine a measurement ran on: CPU model, cores and the ISA extensions that matter
for XLA:CPU and PyTorch kernels (AVX2, AVX-512, AVX512-BF16, AMX)."""

import os
import platform

# /proc/cpuinfo flag -> the name printed.
ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512F", "avx512_bf16": "AVX512-BF16",
             "avx512_vnni": "AVX512-VNNI", "amx_tile": "AMX", "amx_bf16": "AMX-BF16"}


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, set]:
  """(model name, flags) of the first processor listed; ('', set()) where unreadable."""
  model, flags = "", set()
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
          model = value.strip()
        elif key == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return model, flags


def describe(path: str = "/proc/cpuinfo") -> str:
  """e.g. 'CPU: AMD EPYC, 2 cores (AVX2, FMA)' for the table heading."""
  model, flags = _cpuinfo(path)
  model = model or platform.processor() or platform.machine()
  isa = [name for flag, name in ISA_FLAGS.items() if flag in flags]
  cores = len(os.sched_getaffinity(0))
  return f"CPU: {model}, {cores} cores ({', '.join(isa) if isa else 'no AVX2'})"
