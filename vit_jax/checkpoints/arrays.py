"""Moving parameter arrays between the host and (possibly multi-process) device layouts."""

import jax
import numpy as np


def to_host(tree):
  """jax.Arrays -> numpy arrays with the full values, on every process.

  Unlike `jax.device_get`, works for arrays split over several processes (FSDP or tensor
  parallel on multiple hosts): those are gathered, a collective that every process must
  join with the same tree. Host arrays pass through unchanged.
  """
  return jax.tree_util.tree_map(_gather, tree)


def _gather(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def place_like(value, like):
  """`value` (host or device array) cast to `like`'s dtype, on `like`'s sharding if any.

  Works across processes: each process fills only its own shards.
  """
  sharding = getattr(like, "sharding", None)
  if isinstance(value, jax.Array) and sharding is not None:
    return jax.device_put(value.astype(like.dtype), sharding)
  value = np.asarray(value, like.dtype)
  if sharding is None:
    return value
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
