"""The `jax.distributed.initialize` arguments of a SLURM job, read from its environment.

srun starts every task of a job step with SLURM_* variables; `slurm_distributed_kwargs`
turns them into the coordinator, the process count and id, and the GPUs of this task:

  - A multi-task job is one with SLURM_JOB_ID set and SLURM_NTASKS (or SLURM_NPROCS) > 1;
    anything else (no SLURM, or a single task) gives None: stay single-process.
  - process_id = SLURM_PROCID, num_processes = SLURM_NTASKS (else SLURM_NPROCS).
  - coordinator_address = the first host of the step's node list (SLURM_STEP_NODELIST,
    else SLURM_JOB_NODELIST, else SLURM_NODELIST), where srun's default block
    distribution places task 0, and the port of `coordinator_port`.
  - local_device_ids (which of the GPUs the task sees it drives):
      * one task on this node: none given, the task drives every GPU it sees;
      * several tasks on this node (SLURM_NTASKS_PER_NODE, else SLURM_STEP_TASKS_PER_NODE /
        SLURM_TASKS_PER_NODE at SLURM_NODEID), each with g = SLURM_GPUS_PER_TASK GPUs
        (1 when unset):
        - CUDA_VISIBLE_DEVICES lists exactly g GPUs: SLURM bound the task's own GPUs
          (--gpus-per-task does), so again none given;
        - otherwise all tasks see all the node's GPUs and task SLURM_LOCALID takes the
          block [LOCALID * g, (LOCALID + 1) * g).
  - cluster_detection_method='deactivate' always: JAX's own SLURM detection would
    otherwise fill in local_device_ids=[SLURM_LOCALID] whenever none is given, which pins
    a one-task-per-node job to the node's first GPU and fails for a task whose only
    visible GPU is not number LOCALID.

The mapping is a pure function of `environ`, so it is tested with plain dicts.
"""

import itertools
import os
import re
import sys
from typing import Mapping

COORDINATOR_PORT_VARIABLE = "VIT_JAX_COORDINATOR_PORT"
# Without VIT_JAX_COORDINATOR_PORT the port is 61440 + SLURM_JOB_ID % 4096, in
# [61440, 65535]: above Linux's default ephemeral range (32768-60999), so no outgoing
# connection holds it, and two jobs sharing a node get different ports (unless their ids
# differ by a multiple of 4096). JAX's own SLURM detection picks the same port.
DEFAULT_PORT_BASE = 61440
DEFAULT_PORT_SPAN = 4096
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
TASK_COUNT_VARIABLES = ("SLURM_NTASKS", "SLURM_NPROCS")


def slurm_distributed_kwargs(environ: Mapping[str, str]) -> dict | None:
  """`jax.distributed.initialize(**kwargs)` arguments of this SLURM task, or None.

  None when `environ` is not a multi-task SLURM job. Raises ValueError, naming the
  variable, when the environment is inconsistent (SLURM_PROCID >= SLURM_NTASKS, a node list
  that does not parse, a task without SLURM_PROCID).
  """
  num_processes = _task_count(environ)
  if "SLURM_JOB_ID" not in environ or num_processes is None or num_processes <= 1:
    return None
  if "SLURM_PROCID" not in environ:
    raise ValueError(
        f"SLURM job {environ['SLURM_JOB_ID']} has {num_processes} tasks but SLURM_PROCID is "
        "not set: start every task with srun (e.g. `srun python -m vit_jax.main ...`), not "
        "directly in the batch script.")
  process_id = _int_variable(environ, "SLURM_PROCID")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"SLURM_PROCID={process_id} must be in [0, {num_processes}) for a job "
                     f"of SLURM_NTASKS={num_processes} tasks.")
  hosts = job_hosts(environ)
  kwargs = dict(coordinator_address=f"{hosts[0]}:{coordinator_port(environ)}",
                num_processes=num_processes, process_id=process_id,
                cluster_detection_method="deactivate")
  device_ids = _local_device_ids(environ, num_processes, len(hosts))
  if device_ids is not None:
    kwargs["local_device_ids"] = device_ids
  return kwargs


def coordinator_address(environ: Mapping[str, str]) -> str:
  """'host:port' of process 0: the first host of the job's node list and `coordinator_port`."""
  return f"{job_hosts(environ)[0]}:{coordinator_port(environ)}"


def coordinator_port(environ: Mapping[str, str]) -> int:
  """VIT_JAX_COORDINATOR_PORT, else DEFAULT_PORT_BASE + SLURM_JOB_ID % DEFAULT_PORT_SPAN."""
  if environ.get(COORDINATOR_PORT_VARIABLE):
    port = _int_variable(environ, COORDINATOR_PORT_VARIABLE)
    if not 1 <= port <= 65535:
      raise ValueError(f"{COORDINATOR_PORT_VARIABLE}={port} is not a TCP port (1-65535).")
    return port
  return DEFAULT_PORT_BASE + _int_variable(environ, "SLURM_JOB_ID") % DEFAULT_PORT_SPAN


def job_hosts(environ: Mapping[str, str]) -> list[str]:
  """The hosts of the first node-list variable set (NODELIST_VARIABLES), expanded."""
  for name in NODELIST_VARIABLES:
    if environ.get(name):
      try:
        return expand_hostlist(environ[name])
      except ValueError as e:
        raise ValueError(f"{name}={environ[name]!r} is not a SLURM host list: {e}") from None
  raise ValueError(f"None of {', '.join(NODELIST_VARIABLES)} is set: cannot tell which host "
                   "runs the coordinator (process 0).")


def expand_hostlist(nodelist: str) -> list[str]:
  """'gpu-a[1-2],gpu-b3' -> ['gpu-a1', 'gpu-a2', 'gpu-b3']: SLURM's compressed host lists.

  Ranges keep the zero padding of their start ('node[08-10]' -> node08 node09 node10);
  several bracket groups in one name expand left to right ('r[1-2]n[1-2]' -> r1n1 r1n2
  r2n1 r2n2); text after a bracket stays ('n[1-2]-ib' -> n1-ib n2-ib).
  """
  hosts = []
  for pattern in _split_top_level(nodelist):
    pieces = [[piece] if not piece.startswith("[") else _expand_brackets(piece[1:-1])
              for piece in re.split(r"(\[[^\]]*\])", pattern) if piece]
    hosts.extend("".join(parts) for parts in itertools.product(*pieces))
  return hosts


def _split_top_level(nodelist: str) -> list[str]:
  """Splits at the commas outside brackets; checks the brackets pair up."""
  patterns, depth, start = [], 0, 0
  for i, char in enumerate(nodelist):
    if char == "[":
      depth += 1
      if depth > 1:
        raise ValueError(f"nested '[' at position {i}")
    elif char == "]":
      depth -= 1
      if depth < 0:
        raise ValueError(f"']' without '[' at position {i}")
    elif char == "," and depth == 0:
      patterns.append(nodelist[start:i])
      start = i + 1
  if depth:
    raise ValueError("a '[' is never closed")
  patterns.append(nodelist[start:])
  if not all(p.strip() for p in patterns) or any(p != p.strip() for p in patterns):
    raise ValueError("empty or blank-padded host name")
  return patterns


def _expand_brackets(ranges: str) -> list[str]:
  """'01-03,07' -> ['01', '02', '03', '07']."""
  numbers = []
  for item in ranges.split(","):
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
    if not match:
      raise ValueError(f"[{ranges}]: {item!r} is not a number or a range like 01-04")
    first, last = match.group(1), match.group(2) or match.group(1)
    if int(last) < int(first):
      raise ValueError(f"[{ranges}]: range {item!r} runs backwards")
    numbers.extend(str(n).zfill(len(first)) for n in range(int(first), int(last) + 1))
  return numbers


def _local_device_ids(environ, num_processes: int, num_hosts: int) -> list[int] | None:
  """The GPU block of this task when several tasks share the node's GPUs, else None."""
  if _tasks_on_this_node(environ, num_processes, num_hosts) <= 1:
    return None
  gpus_per_task = 1
  if environ.get("SLURM_GPUS_PER_TASK"):
    # --gpus-per-task=[type:]count
    gpus_per_task = _parse_int("SLURM_GPUS_PER_TASK", environ["SLURM_GPUS_PER_TASK"],
                               environ["SLURM_GPUS_PER_TASK"].rsplit(":", 1)[-1])
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if len(visible) == gpus_per_task:
    return None  # SLURM bound this task's own GPUs; it sees nothing else.
  if "SLURM_LOCALID" not in environ:
    raise ValueError("Several SLURM tasks share this node but SLURM_LOCALID is not set, so "
                     "the task cannot tell which of the node's GPUs are its own.")
  local_id = _int_variable(environ, "SLURM_LOCALID")
  device_ids = list(range(local_id * gpus_per_task, (local_id + 1) * gpus_per_task))
  if visible and device_ids[-1] >= len(visible):
    raise ValueError(
        f"SLURM_LOCALID={local_id} with {gpus_per_task} GPU(s) per task needs GPUs "
        f"{device_ids[0]}-{device_ids[-1]}, but CUDA_VISIBLE_DEVICES lists {len(visible)}: "
        "ask for as many GPUs per node as tasks per node x SLURM_GPUS_PER_TASK.")
  return device_ids


def _tasks_on_this_node(environ, num_processes: int, num_hosts: int) -> int:
  """SLURM_NTASKS_PER_NODE, else this node's entry of SLURM_(STEP_)TASKS_PER_NODE."""
  if environ.get("SLURM_NTASKS_PER_NODE"):
    return _int_variable(environ, "SLURM_NTASKS_PER_NODE")
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if environ.get(name):
      counts = _expand_task_counts(name, environ[name])
      node = _int_variable(environ, "SLURM_NODEID") if environ.get("SLURM_NODEID") else 0
      return counts[node] if node < len(counts) else max(counts)
  return -(-num_processes // num_hosts)  # Spread evenly, rounded up.


def _expand_task_counts(name: str, value: str) -> list[int]:
  """SLURM's '2(x3),1' -> [2, 2, 2, 1]."""
  counts = []
  for item in value.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
    if not match:
      raise ValueError(f"{name}={value!r}: {item!r} is not a count like 4 or 4(x2).")
    counts.extend([int(match.group(1))] * int(match.group(2) or 1))
  return counts


def _task_count(environ) -> int | None:
  for name in TASK_COUNT_VARIABLES:
    if environ.get(name):
      return _int_variable(environ, name)
  return None


def _int_variable(environ, name: str) -> int:
  return _parse_int(name, environ[name], environ[name])


def _parse_int(name: str, value: str, digits: str) -> int:
  """int(digits), where `digits` is (part of) the value of variable `name`."""
  try:
    return int(digits)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def main() -> int:
  """`python -m vit_jax.parallel.slurm`: prints this job's coordinator address (host:port)."""
  try:
    print(coordinator_address(os.environ))
  except ValueError as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
