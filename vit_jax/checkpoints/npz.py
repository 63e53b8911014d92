"""The published flat `.npz` checkpoints (Google vit_jax, big_vision, this project).

Keys are '/'-joined tree paths, e.g.
`Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel` [dim, heads, head_dim].
"""

import io
import os
import re
import zipfile

import jax
import numpy as np
from etils import epath

from vit_jax.checkpoints.arrays import to_host
from vit_jax.checkpoints.errors import CheckpointError
from vit_jax.models import params as names

_PREFIXES = ("opt/target/", "params/")


def read_npz(path) -> dict[str, np.ndarray]:
  """The raw arrays of an `.npz` (local or any `etils.epath` path) without pickle."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint file {path} does not exist.")
  data = path.read_bytes()
  if not data.startswith(b"PK"):
    raise CheckpointError(f"{path} is not an .npz (zip) file (it starts with {data[:8]!r}); "
                          "pass a checkpoint written by np.savez / save_npz.")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      return {key: npz[key] for key in npz.files}
  except (zipfile.BadZipFile, EOFError, OSError) as e:
    raise CheckpointError(
        f"{path} is not a readable .npz file ({type(e).__name__}: {e}); it may be truncated "
        "(an interrupted download or copy): fetch it again and compare its size.") from e
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise CheckpointError(
          f"{path} contains pickled Python objects, which are not loaded for safety; "
          "published checkpoints hold plain arrays only. Re-export it with "
          "vit_jax.checkpoints.save_npz.") from e
    raise CheckpointError(f"{path} could not be read: {e}") from e


def _strip_prefix(flat: dict) -> dict:
  """The model's arrays without `opt/target/` or `params/` (other train-state keys dropped)."""
  for prefix in _PREFIXES:
    if f"{prefix}{names.EMBEDDING}/kernel" in flat or flat and all(
        k.startswith(prefix) for k in flat):
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return flat


def _rename_old_block_layers(key: str) -> str:
  """`encoderblock_3/MlpBlock_3/...` -> `encoderblock_3/MlpBlock_0/...` (old numbering)."""
  parts = key.split("/")
  for i in range(1, len(parts)):
    in_block = parts[i - 1] == names.SCANNED_BLOCK or names.block_index(parts[i - 1]) is not None
    if in_block and parts[i] in names.OLD_BLOCK_NAMES:
      parts[i] = names.OLD_BLOCK_NAMES[parts[i]]
  return "/".join(parts)


def _uses_old_numbering(flat: dict) -> bool:
  old = [n for n, new in names.OLD_BLOCK_NAMES.items() if n != new]
  return any(f"/{n}/" in k for k in flat for n in old)


def _is_group_norm(key: str) -> bool:
  return bool(re.search(r"(^|/)gn_?\w*/(scale|bias)$", key))


def _unstack_blocks(flat: dict) -> dict:
  """big_vision's scanned `Transformer/encoderblock/<leaf>` [layers, ...] -> per layer."""
  stacked = f"{names.TRANSFORMER}/{names.SCANNED_BLOCK}/"
  out = {}
  for key, value in flat.items():
    if key.startswith(stacked):
      for i in range(value.shape[0]):
        out[f"{names.TRANSFORMER}/{names.block_name(i)}/{key[len(stacked):]}"] = value[i]
    else:
      out[key] = value
  return out


def normalize_npz(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Any supported flat checkpoint -> this project's flat per-layer keys.

  - `opt/target/` (old Flax optimizer) and `params/` (big_vision) prefixes are removed.
  - Old global numbering in blocks (LayerNorm_0, MultiHeadDotProductAttention_1,
    LayerNorm_2, MlpBlock_3) becomes Linen numbering (..._0, ..._0, LayerNorm_1, ..._0).
  - GroupNorm scale/bias stored as (1, 1, 1, C) become (C,).
  - big_vision's top-level `pos_embedding` covers only the patch grid: big_vision adds it
    BEFORE prepending the class token, so the class token never gets a position
    embedding. Here it is added after, so when the checkpoint has a class token (`cls`)
    the embedding gets a leading ZERO row for it: the model computes exactly the same.
  - big_vision's stacked (scanned) `Transformer/encoderblock` is split per layer.
  """
  flat = _strip_prefix(dict(flat))
  if _uses_old_numbering(flat):
    flat = {_rename_old_block_layers(k): v for k, v in flat.items()}
  flat = {k: (v.reshape(v.shape[-1]) if _is_group_norm(k) and v.ndim == 4 else v)
          for k, v in flat.items()}
  if "pos_embedding" in flat:
    if names.POSEMB in flat:
      raise CheckpointError("The checkpoint has both a top-level 'pos_embedding' and "
                            f"'{names.POSEMB}'; cannot tell which one the model used.")
    pe = flat.pop("pos_embedding")
    pe = pe.reshape((1, -1, pe.shape[-1]))
    if names.CLS in flat:
      pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    flat[names.POSEMB] = pe
  return _unstack_blocks(flat)


def load_npz(path) -> dict:
  """A published `.npz` checkpoint (Google vit_jax, big_vision, this project) -> params.

  Returns a nested dict of numpy arrays in this project's per-layer tree; the dtypes are
  the file's. See `normalize_npz` for the layouts accepted.
  """
  flat = read_npz(path)
  if not flat:
    raise CheckpointError(f"{path} holds no arrays.")
  return names.unflatten(normalize_npz(flat))


def save_npz(path, params) -> None:
  """Writes params (per-layer or scanned, optionally under 'params') in the reference layout.

  Every process must call it (sharded arrays are gathered); process 0 writes. The file
  appears complete or not at all: on local disk it is written under a temporary name,
  then renamed; on object storage (gs://) one upload is already all-or-nothing, and a
  rename would be a copy and a delete.
  """
  if set(params) == {"params"}:
    params = params["params"]
  if names.TRANSFORMER in params:
    params = names.scan_to_unrolled(params)
  flat = {k: np.asarray(v) for k, v in names.flatten(to_host(params)).items()}
  if jax.process_index() != 0:
    return
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  path = epath.Path(path)
  if "://" in os.fspath(path):
    path.write_bytes(buffer.getvalue())
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.parent / f".{path.name}.partial"
  partial.write_bytes(buffer.getvalue())
  partial.replace(path)
