"""Timing, FLOP and memory measurements shared by the benchmark rows."""

import resource
import statistics
import time
from typing import Optional


def median_seconds(fn, *, warmup: int, runs: int) -> tuple[Optional[float], Optional[float]]:
  """Median (wall, CPU) seconds of `fn()` (which must block until done) after `warmup` calls.

  CPU seconds (of all this process's threads) are much steadier than wall time on a shared
  machine. With runs=0 nothing runs and both are None (compile-only rows).
  """
  if runs == 0:
    return None, None
  for _ in range(warmup):
    fn()
  wall, cpu = [], []
  for _ in range(runs):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(wall), statistics.median(cpu)


def host_peak_gb() -> float:
  """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_peak_gb() -> Optional[float]:
  """Largest `peak_bytes_in_use` over the local devices, or None (the CPU reports none)."""
  import jax
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) / 2**30 if peaks else None


def matmul_peak_gflops(size: int = 0, runs: int = 5,
                       dtype: str = "float32") -> tuple[float, float]:
  """(GFLOP/s, GFLOP per CPU-second) of a jitted [size, size] @ [size, size] in `dtype`.

  size 0: 2048 on the CPU, 8192 on an accelerator (a smaller product is launch-bound there).
  """
  import jax
  import jax.numpy as jnp
  size = size or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  wall, cpu = median_seconds(lambda: matmul(a, a).block_until_ready(), warmup=2, runs=runs)
  return 2 * size**3 / wall / 1e9, 2 * size**3 / cpu / 1e9


def compiled_stats(compiled, num_partitions: int) -> dict:
  """FLOPs (whole program; XLA counts one partition) and buffer sizes of a compiled step."""
  flops = flops_of(compiled.cost_analysis())
  mem = compiled.memory_analysis()
  stats = {"flops": flops * num_partitions if flops else None}
  if mem is not None:
    stats["xla_buffers_gb"] = num_partitions * (
        mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        - mem.alias_size_in_bytes) / 2**30
    stats["xla_temp_gb"] = num_partitions * mem.temp_size_in_bytes / 2**30
  return stats


def timed_compile(jitted, *args):
  """(compiled, stats): wall and CPU seconds of lower+compile (of which tracing and lowering
  took `lower_s`) and the FLOPs before optimisation."""
  start, start_cpu = time.perf_counter(), time.process_time()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  stats = {"compile_s": time.perf_counter() - start, "lower_s": lower_s,
           "compile_cpu_s": time.process_time() - start_cpu}
  stats["lowered_flops"] = flops_of(lowered.cost_analysis())
  return compiled, stats


def flops_of(cost) -> Optional[float]:
  """The 'flops' of a cost analysis; None where the backend gives none (e.g. lowered, GPU)."""
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def lowered_flops(jitted, *args) -> Optional[float]:
  """Whole-program FLOPs of the lowered (not yet partitioned or compiled) computation."""
  return flops_of(jitted.lower(*args).cost_analysis())
