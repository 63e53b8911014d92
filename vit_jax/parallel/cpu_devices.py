"""Process-level JAX setup shared by the trainer and the benchmark."""

import os


def configure_cpu_devices(count: int | None = None) -> int | None:
  """Split the host CPU into `count` XLA devices (default: one per core).

  One XLA CPU device leaves much of a multi-core machine idle; sharding the batch over
  several is faster (see README, Performance). Must run before JAX initialises its
  backends. Does nothing when the user already chose (XLA_FLAGS names a device count, or
  JAX_NUM_CPU_DEVICES is set) or when JAX_PLATFORMS excludes the CPU. Returns the count set.
  """
  import jax  # Imported here so that callers can set environment variables first.

  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  if os.environ.get("JAX_NUM_CPU_DEVICES"):
    return None
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return None
  count = count or len(os.sched_getaffinity(0))
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # Backends already initialised: keep what is there.
    return None
  return count
