"""Device meshes, parameter shardings and multi-host start-up.

Layouts (a `jax.sharding.Mesh` with named axes):
  - data parallel (default): mesh (('data', -1),); the batch is split over 'data', params
    and optimizer state are replicated.
  - FSDP (`config.fsdp`): as above, but every large parameter (and its optimizer state)
    is split over the batch axes along its largest divisible dimension.
  - tensor parallel: a 'model' axis, e.g. (('data', 4), ('model', 2)). The MLP's Dense_0
    kernel is split by columns and Dense_1 by rows; the attention projections are split
    over heads (query/key/value kernels [dim, heads, head_dim] on axis 1, out kernel
    [heads, head_dim, dim] on axis 0). XLA inserts the all-reduces (Megatron-style).
Every axis except 'model' carries the batch.
"""

import logging
import os
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODEL_AXIS = "model"
# Parameters smaller than this (elements) stay replicated under FSDP: sharding them saves
# little memory and costs a collective each.
DEFAULT_FSDP_MIN_SIZE = 2**14
EXAMPLE_MESH_SPECS = "(('data', -1),) or (('data', 4), ('model', 2))"

# Tensor-parallel rules: (path regex, PartitionSpec of the parameter's trailing axes).
# A leading layer axis (scan=True) is left unsplit.
_TP_RULES = (
    (r"MlpBlock_0/Dense_0/kernel$", (None, MODEL_AXIS)),
    (r"MlpBlock_0/Dense_0/bias$", (MODEL_AXIS,)),
    (r"MlpBlock_0/Dense_1/kernel$", (MODEL_AXIS, None)),
    (r"MultiHeadDotProductAttention_0/(query|key|value)/kernel$", (None, MODEL_AXIS, None)),
    (r"MultiHeadDotProductAttention_0/(query|key|value)/bias$", (MODEL_AXIS, None)),
    (r"MultiHeadDotProductAttention_0/out/kernel$", (MODEL_AXIS, None, None)),
)


def _parse_mesh_spec(mesh_spec) -> list[tuple[str, int]]:
  """(('data', -1), ...) (or a 'data:-1,model:2' string) -> [(name, size), ...]."""
  if isinstance(mesh_spec, str):
    mesh_spec = [item.split(":") for item in mesh_spec.split(",") if item.strip()]
  try:
    pairs = [(str(name).strip(), int(size)) for name, size in mesh_spec]
  except (TypeError, ValueError) as e:
    raise ValueError(f"Bad mesh spec {mesh_spec!r}: expected a list of (axis_name, size) "
                     f"pairs such as {EXAMPLE_MESH_SPECS}.") from e
  names = [name for name, _ in pairs]
  if not pairs or len(set(names)) != len(names):
    raise ValueError(f"Bad mesh spec {mesh_spec!r}: need at least one axis and unique axis "
                     f"names, e.g. {EXAMPLE_MESH_SPECS}.")
  if names == [MODEL_AXIS]:
    raise ValueError(f"Mesh spec {mesh_spec!r} has no axis for the batch; add one, e.g. "
                     f"(('data', -1), ('model', 2)).")
  return pairs


def _resolve_sizes(pairs, num_devices: int, mesh_spec) -> tuple[int, ...]:
  """Replaces the one -1 with whatever devices are left; checks the product."""
  sizes = [size for _, size in pairs]
  hint = (f"There are {num_devices} devices; the sizes must multiply to {num_devices}, "
          f"e.g. {EXAMPLE_MESH_SPECS}.")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"Bad mesh spec {mesh_spec!r}: sizes must be positive, with at most "
                     f"one -1 (= the remaining devices). {hint}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"Mesh spec {mesh_spec!r} does not divide the devices: {known} does "
                       f"not divide {num_devices}. {hint}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"Mesh spec {mesh_spec!r} needs {int(np.prod(sizes))} devices. {hint}")
  return tuple(sizes)


def make_mesh(mesh_spec, devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` from ((axis_name, size), ...); one size may be -1 (= the rest).

  Devices are laid out in process order, so the first axis ('data') is the one that
  crosses hosts and each host's devices hold a contiguous slice of the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  pairs = _parse_mesh_spec(mesh_spec)
  shape = _resolve_sizes(pairs, len(devices), mesh_spec)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices,
                                         allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, tuple(name for name, _ in pairs))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: all but 'model'."""
  return tuple(name for name in mesh.axis_names if name != MODEL_AXIS)


def num_batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is cut into (product of the batch axes' sizes)."""
  return int(np.prod([mesh.shape[name] for name in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _tensor_parallel_spec(name: str, shape, model_size: int) -> list:
  """Per-axis spec for the 'model' axis (all None when no rule matches)."""
  spec = [None] * len(shape)
  if model_size <= 1:
    return spec
  for pattern, trailing in _TP_RULES:
    if not re.search(pattern, name):
      continue
    offset = len(shape) - len(trailing)
    for i, axis in enumerate(trailing):
      if axis is not None and shape[offset + i] % model_size:
        raise ValueError(
            f"Cannot split {name} {tuple(shape)} over the 'model' axis of size "
            f"{model_size}: axis {offset + i} (size {shape[offset + i]}) is not divisible. "
            f"Choose a 'model' size that divides num_heads and mlp_dim, or drop it.")
      spec[offset + i] = axis
  return spec


def _fsdp_spec(spec: list, shape, axes: tuple[str, ...], shards: int, min_size: int):
  """Adds the batch axes to the largest still-unsplit axis divisible by `shards`."""
  if shards <= 1 or int(np.prod(shape)) < min_size:
    return spec
  free = [i for i, a in enumerate(spec) if a is None and shape[i] % shards == 0]
  if not free:
    return spec
  best = max(free, key=lambda i: (shape[i], -i))
  spec = list(spec)
  spec[best] = axes if len(axes) > 1 else axes[0]
  return spec


def param_specs(abstract_params, mesh: Mesh, *, fsdp: bool,
                fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
  """A PartitionSpec per parameter (same tree as `abstract_params`)."""
  model_size = mesh.shape.get(MODEL_AXIS, 1)
  axes, shards = batch_axes(mesh), num_batch_shards(mesh)

  def spec_for(path, leaf):
    name, shape = _path_str(path), tuple(leaf.shape)
    spec = _tensor_parallel_spec(name, shape, model_size)
    if fsdp:
      spec = _fsdp_spec(spec, shape, axes, shards, fsdp_min_size)
    return P(*spec) if any(a is not None for a in spec) else P()

  return jax.tree_util.tree_map_with_path(spec_for, abstract_params)


def param_shardings(abstract_params, mesh: Mesh, *, fsdp: bool,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
  """A NamedSharding per parameter: TP over 'model' if the mesh has it, FSDP if asked.

  Args:
    abstract_params: the params tree (arrays or jax.ShapeDtypeStruct).
    mesh: from `make_mesh`.
    fsdp: split each parameter of at least `fsdp_min_size` elements over the batch axes,
      along its largest dimension that the number of batch shards divides.
  """
  specs = param_specs(abstract_params, mesh, fsdp=fsdp, fsdp_min_size=fsdp_min_size)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


# --------------------------------------------------------------------------- multi-host

DISTRIBUTED_MODES = ("auto", "on", "off")


def default_distributed_config() -> ml_collections.ConfigDict:
  """The `config.distributed` block: mode 'auto' | 'on' | 'off' plus an explicit cluster.

  'auto' initialises when a coordinator address is given or the environment shows a
  multi-process job (SLURM with >1 task, Open MPI with >1 rank, JAX_COORDINATOR_ADDRESS,
  a multi-worker Cloud TPU); 'on' always calls `jax.distributed.initialize` (JAX then
  detects the cluster itself, e.g. on TPU pods); 'off' never does.
  """
  c = ml_collections.ConfigDict()
  c.mode = "auto"
  c.coordinator_address = ml_collections.config_dict.placeholder(str)
  c.num_processes = ml_collections.config_dict.placeholder(int)
  c.process_id = ml_collections.config_dict.placeholder(int)
  return c


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

  Reads `config.distributed` (see `default_distributed_config`; a plain string is taken
  as its mode, a missing block as 'auto').
  """
  environ = os.environ if environ is None else environ
  dist = config.get("distributed", None) if hasattr(config, "get") else None
  if dist is None or isinstance(dist, (str, bool)):
    mode = {True: "on", False: "off", None: "auto"}.get(dist, dist)
    dist = ml_collections.ConfigDict()
  else:
    mode = dist.get("mode", "auto")
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"Unknown config.distributed.mode {mode!r}; choose one of "
                     f"{DISTRIBUTED_MODES}.")
  if mode == "off":
    return None
  address = dist.get("coordinator_address", None)
  num, pid = dist.get("num_processes", None), dist.get("process_id", None)
  if address:
    if num is None or pid is None:
      raise ValueError(
          f"config.distributed.coordinator_address={address!r} needs num_processes and "
          "process_id as well, e.g. --config.distributed.num_processes=2 "
          "--config.distributed.process_id=0 (a different id on each process).")
    if not 0 <= pid < num:
      raise ValueError(f"config.distributed.process_id={pid} must be in [0, {num}).")
    return dict(coordinator_address=address, num_processes=num, process_id=pid)
  if mode == "on" or _environment_is_multiprocess(environ):
    return {}  # JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, env vars).
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
