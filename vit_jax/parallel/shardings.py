"""Parameter and train-state shardings: data parallel, FSDP and tensor parallel.

  - data parallel: parameters and optimizer state replicated.
  - FSDP (`fsdp=True`): every large parameter (and its optimizer state) is split over the
    batch axes along its largest divisible dimension.
  - tensor parallel (a 'model' mesh axis): the MLP's first Dense kernel is split by
    columns and the second by rows; the attention projections are split over heads
    (query/key/value kernels [dim, heads, head_dim] on axis 1, out kernel
    [heads, head_dim, dim] on axis 0). XLA inserts the all-reduces (Megatron-style).
"""

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax.models import params as names
from vit_jax.parallel.mesh import MODEL_AXIS, batch_axes, num_batch_shards, replicated

# Parameters smaller than this (elements) stay replicated under FSDP: sharding them saves
# little memory and costs a collective each.
DEFAULT_FSDP_MIN_SIZE = 2**14

_QKV = "(" + "|".join(names.QKV) + ")"
# Tensor-parallel rules: (path regex, PartitionSpec of the parameter's trailing axes).
# A leading layer axis (scan=True) is left unsplit.
TP_RULES = (
    (rf"{names.MLP_IN}/kernel$", (None, MODEL_AXIS)),
    (rf"{names.MLP_IN}/bias$", (MODEL_AXIS,)),
    (rf"{names.MLP_OUT}/kernel$", (MODEL_AXIS, None)),
    (rf"{names.ATTENTION}/{_QKV}/kernel$", (None, MODEL_AXIS, None)),
    (rf"{names.ATTENTION}/{_QKV}/bias$", (MODEL_AXIS, None)),
    (rf"{names.ATTENTION}/{names.ATTENTION_OUT}/kernel$", (MODEL_AXIS, None, None)),
)


def _tensor_parallel_spec(name: str, shape, model_size: int) -> list:
  """Per-axis spec for the 'model' axis (all None when no rule matches)."""
  spec = [None] * len(shape)
  if model_size <= 1:
    return spec
  for pattern, trailing in TP_RULES:
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
    name, shape = names.path_str(path), tuple(leaf.shape)
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




def opt_state_shardings(opt_shapes, params_shapes, params_shardings, mesh: Mesh):
  """Optimizer-state leaves that mirror a parameter get its sharding; the rest replicate."""
  by_name = {names.dict_path(p): sh
             for p, sh in jax.tree_util.tree_leaves_with_path(params_shardings)}
  shapes = {names.dict_path(p): x.shape
            for p, x in jax.tree_util.tree_leaves_with_path(params_shapes)}
  rep = replicated(mesh)

  def pick(path, leaf):
    name = names.dict_path(path)
    if name in by_name and shapes[name] == leaf.shape:
      return by_name[name]
    return rep

  return jax.tree_util.tree_map_with_path(pick, opt_shapes)
