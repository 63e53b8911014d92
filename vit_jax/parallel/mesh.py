"""Device meshes and the batch's layout on them.

A `jax.sharding.Mesh` with named axes, from `config.mesh` = ((axis, size), ...):
  - data parallel (default): (('data', -1),); the batch is split over 'data'.
  - with a 'model' axis, e.g. (('data', 4), ('model', 2)): tensor parallelism over
    'model' (see shardings.py). Every axis except 'model' carries the batch.
"""

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODEL_AXIS = "model"
EXAMPLE_MESH_SPECS = "(('data', -1),) or (('data', 4), ('model', 2))"


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


def check_batch_divisible(size: int, mesh: Mesh, accum_steps: int = 1,
                          field: str = "config.batch_size") -> None:
  """ValueError unless a batch of `size` splits into accum_steps x batch shards.

  The one divisibility rule of the project: the config check, the train and eval steps
  (on the batches they get) and the input pipeline (per process) all call it.
  """
  shards = num_batch_shards(mesh)
  parts = shards * accum_steps
  if size > 0 and size % parts == 0:
    return
  what = f"{shards} data-parallel devices" + (
      f" x {accum_steps} accum_steps" if accum_steps > 1 else "")
  lower, upper = (size // parts) * parts, -(-size // parts) * parts
  flag = f"--{field}=" if field.startswith("config.") else ""
  suggestion = " or ".join(str(s) for s in sorted({lower, upper}) if s > 0)
  raise ValueError(f"{field}={size} is not divisible by the {what} (mesh {dict(mesh.shape)}). "
                   f"Use a multiple of {parts}, e.g. {flag}{suggestion}.")
