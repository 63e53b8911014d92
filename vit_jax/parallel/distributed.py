"""Multi-host start-up: when and how to call `jax.distributed.initialize`."""

import logging
import os

import jax

from vit_jax.parallel import slurm

DISTRIBUTED_MODES = ("auto", "on", "off")


def _environment_is_multiprocess(environ) -> str | None:
  """A description of the multi-process launcher found in `environ`, or None."""
  if int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")) or 1) > 1 \
      and "SLURM_JOB_ID" in environ:
    return f"SLURM job {environ['SLURM_JOB_ID']} with {environ.get('SLURM_NTASKS')} tasks"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return f"Open MPI job with {environ['OMPI_COMM_WORLD_SIZE']} ranks"
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return f"JAX_COORDINATOR_ADDRESS={environ['JAX_COORDINATOR_ADDRESS']}"
  hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return f"Cloud TPU pod with workers {hosts}"
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU multislice job"
  return None


def distributed_init_kwargs(config, environ=None) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None to stay single-process.

  Reads `config.distributed` (the block in configs/common.py).
  """
  environ = os.environ if environ is None else environ
  dist = config.distributed
  mode = dist.mode
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"Unknown config.distributed.mode {mode!r}; choose one of "
                     f"{DISTRIBUTED_MODES}.")
  if mode == "off":
    return None
  address = dist.coordinator_address
  num, pid = dist.num_processes, dist.process_id
  if address:
    if num is None or pid is None:
      raise ValueError(
          f"config.distributed.coordinator_address={address!r} needs num_processes and "
          "process_id as well, e.g. --config.distributed.num_processes=2 "
          "--config.distributed.process_id=0 (a different id on each process).")
    if not 0 <= pid < num:
      raise ValueError(f"config.distributed.process_id={pid} must be in [0, {num}).")
    return dict(coordinator_address=address, num_processes=num, process_id=pid)
  slurm_kwargs = slurm.slurm_distributed_kwargs(environ)  # ValueError for a bad SLURM env.
  if slurm_kwargs is not None:
    return slurm_kwargs
  if mode == "on" or _environment_is_multiprocess(environ):
    return {}  # JAX's own cluster detection (Open MPI, Cloud TPU, env vars).
  return None


def initialize_distributed(config) -> None:
  """Calls `jax.distributed.initialize` when the config or the environment asks for it.

  Must run before any other JAX call that touches devices. A no-op when already
  initialised or when the job is single-process.
  """
  kwargs = distributed_init_kwargs(config)
  if kwargs is None or jax.distributed.is_initialized():
    return
  logging.info("Initialising jax.distributed (%s).",
               kwargs or _environment_is_multiprocess(os.environ) or "auto-detect")
  jax.distributed.initialize(**kwargs)
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
