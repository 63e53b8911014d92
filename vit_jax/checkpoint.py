"""Checkpoints: Google/big_vision `.npz` files, fine-tuning loads, Orbax train states.

Parameter trees are nested dicts in this project's (Linen) layout, e.g.
`Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel` [dim, heads, head_dim].

- `load_npz` / `save_npz`: the published flat `.npz` files (keys are '/'-joined paths).
- `load_pretrained`: a checkpoint adapted to a new model for fine-tuning (fresh head,
  resampled position embeddings, one error listing every mismatch).
- `save_params` / `restore_params` and `TrainCheckpointer`: Orbax directories.
"""

import fnmatch
import io
import re
import zipfile
from typing import Any, Sequence

import jax
import numpy as np
import scipy.ndimage
from etils import epath

from vit_jax.checkpoints import CheckpointError
from vit_jax.checkpoints.orbax_io import (
    TrainCheckpointer, place_like, restore_params, save_params)
from vit_jax.models import layout

RESAMPLE_METHODS = ("zoom", "bilinear", "bicubic")

# Pre-Linen global numbering inside an encoder block -> the Linen per-type numbering.
_OLD_BLOCK_NAMES = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}
_POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
_PREFIXES = ("opt/target/", "params/")


# ----------------------------------------------------------------------------- trees


def flatten(tree, sep: str = "/") -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items") and not hasattr(value, "shape"):
      for sub, leaf in flatten(value, sep).items():
        flat[f"{key}{sep}{sub}"] = leaf
    else:
      flat[str(key)] = value
  return flat


def unflatten(flat: dict[str, Any], sep: str = "/") -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(sep)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


# ----------------------------------------------------------------------------- npz


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
          "vit_jax.checkpoint.save_npz.") from e
    raise CheckpointError(f"{path} could not be read: {e}") from e


def _strip_prefix(flat: dict) -> dict:
  """The model's arrays without `opt/target/` or `params/` (other train-state keys dropped)."""
  for prefix in _PREFIXES:
    if f"{prefix}embedding/kernel" in flat or flat and all(k.startswith(prefix) for k in flat):
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return flat


def _rename_old_block_layers(key: str) -> str:
  """`encoderblock_3/MlpBlock_3/...` -> `encoderblock_3/MlpBlock_0/...` (old numbering)."""
  parts = key.split("/")
  for i in range(1, len(parts)):
    if re.fullmatch(r"encoderblock(_\d+)?", parts[i - 1]) and parts[i] in _OLD_BLOCK_NAMES:
      parts[i] = _OLD_BLOCK_NAMES[parts[i]]
  return "/".join(parts)


def _uses_old_numbering(flat: dict) -> bool:
  return any("/MultiHeadDotProductAttention_1/" in k or "/MlpBlock_3/" in k for k in flat)


def _is_group_norm(key: str) -> bool:
  return bool(re.search(r"(^|/)gn_?\w*/(scale|bias)$", key))


def _unstack_blocks(flat: dict) -> dict:
  """big_vision's scanned `Transformer/encoderblock/<leaf>` [layers, ...] -> per layer."""
  stacked = "Transformer/encoderblock/"
  out = {}
  for key, value in flat.items():
    if key.startswith(stacked):
      for i in range(value.shape[0]):
        out[f"Transformer/encoderblock_{i}/{key[len(stacked):]}"] = value[i]
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
    if _POSEMB_KEY in flat:
      raise CheckpointError("The checkpoint has both a top-level 'pos_embedding' and "
                            f"'{_POSEMB_KEY}'; cannot tell which one the model used.")
    pe = flat.pop("pos_embedding")
    pe = pe.reshape((1, -1, pe.shape[-1]))
    if "cls" in flat:
      pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    flat[_POSEMB_KEY] = pe
  return _unstack_blocks(flat)


def load_npz(path) -> dict:
  """A published `.npz` checkpoint (Google vit_jax, big_vision, this project) -> params.

  Returns a nested dict of numpy arrays in this project's per-layer tree; the dtypes are
  the file's. See `normalize_npz` for the layouts accepted.
  """
  flat = read_npz(path)
  if not flat:
    raise CheckpointError(f"{path} holds no arrays.")
  return unflatten(normalize_npz(flat))


def _to_host(x) -> np.ndarray:
  """A numpy copy of `x`, gathering arrays sharded over several processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_npz(path, params) -> None:
  """Writes params (per-layer or scanned, optionally under 'params') in the reference layout.

  Every process must call it (sharded arrays are gathered); process 0 writes. The file
  appears complete or not at all (written under a temporary name, then renamed).
  """
  if set(params) == {"params"}:
    params = params["params"]
  params = layout.scan_to_unrolled(params) if "Transformer" in params else params
  flat = {k: _to_host(v) for k, v in flatten(params).items()}
  if jax.process_index() != 0:
    return
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.parent / f".{path.name}.partial"
  partial.write_bytes(buffer.getvalue())
  partial.replace(path)


# ----------------------------------------------------------------------------- resampling


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of PyTorch's bilinear (align_corners=False) interpolation."""
  src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(int), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), lo), 1 - frac)
  np.add.at(w, (np.arange(n_out), hi), frac)
  return w


def _cubic_weights(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] matrix of PyTorch's bicubic (align_corners=False, no antialias)."""
  src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  base = np.floor(src).astype(int)
  t = src - base
  w = np.zeros((n_out, n_in))
  for offset in (-1, 0, 1, 2):
    d = np.abs(t - offset)
    k = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                 np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))
    np.add.at(w, (np.arange(n_out), np.clip(base + offset, 0, n_in - 1)), k)
  return w


def resample_grid(grid: np.ndarray, new_grid: tuple[int, int], method: str = "zoom"):
  """[rows, cols, dim] -> [new_rows, new_cols, dim] by `method` (see RESAMPLE_METHODS).

  'zoom' is the reference: scipy.ndimage.zoom(order=1), whose samples include both
  corners; 'bilinear' and 'bicubic' follow torch's interpolate (align_corners=False).
  """
  rows, cols, _ = grid.shape
  if method == "zoom":
    return scipy.ndimage.zoom(grid, (new_grid[0] / rows, new_grid[1] / cols, 1), order=1)
  if method not in RESAMPLE_METHODS:
    raise ValueError(f"Unknown resampling method {method!r}; choose one of {RESAMPLE_METHODS}.")
  weights = _linear_weights if method == "bilinear" else _cubic_weights
  out = np.einsum("ir,rcd,jc->ijd", weights(rows, new_grid[0]), grid.astype(np.float64),
                  weights(cols, new_grid[1]))
  return out.astype(grid.dtype)


def resample_posemb(posemb, new_grid: tuple[int, int], num_prefix_tokens: int,
                    method: str = "zoom") -> np.ndarray:
  """Position embeddings [1, prefix + side * side, dim] -> [1, prefix + rows * cols, dim].

  The first `num_prefix_tokens` rows (the class token's) are kept as they are; the rest
  must form a square grid (as in every published checkpoint).
  """
  posemb = np.asarray(posemb)
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  side = int(round(np.sqrt(grid.shape[0])))
  if side * side != grid.shape[0]:
    raise CheckpointError(
        f"Cannot resample position embeddings: {grid.shape[0]} grid tokens (after "
        f"{num_prefix_tokens} prefix tokens) do not form a square grid.")
  grid = resample_grid(grid.reshape(side, side, -1), tuple(new_grid), method)
  return np.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


# ----------------------------------------------------------------------------- fine-tuning


def _cfg(config, name, default=None):
  return config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)


def _leaf_shape(leaf) -> tuple:
  return tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)


def _adapt_posemb(restored: dict, init_flat: dict, method: str) -> None:
  """Resamples `restored`'s position embeddings (in place) to the grid of `init_flat`."""
  if _POSEMB_KEY not in restored or _POSEMB_KEY not in init_flat:
    return
  old, new = restored[_POSEMB_KEY], init_flat[_POSEMB_KEY]
  new_shape = _leaf_shape(new)
  if tuple(old.shape) == new_shape or old.shape[-1] != new_shape[-1]:
    return  # Same grid, or a width mismatch that the key check reports.
  old_prefix = 1 if "cls" in restored else 0
  new_prefix = 1 if "cls" in init_flat else 0
  grid_tokens = new_shape[1] - new_prefix
  side = int(round(np.sqrt(grid_tokens)))
  if side * side != grid_tokens:
    raise CheckpointError(f"The model's position embeddings {new_shape} are not a square "
                          "grid; resample them yourself with resample_posemb.")
  pe = resample_posemb(old, (side, side), old_prefix, method)
  if old_prefix and not new_prefix:
    pe = pe[:, 1:]  # The model has no class token: its embedding row is dropped.
  elif new_prefix and not old_prefix:
    pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
  restored[_POSEMB_KEY] = pe


def _mismatch_report(restored: dict, init_flat: dict, allow: Sequence[str]) -> list[str]:
  allowed = lambda key: any(fnmatch.fnmatchcase(key, pattern) for pattern in allow)
  lines = []
  missing = [k for k in init_flat if k not in restored and not allowed(k)]
  unexpected = [k for k in restored if k not in init_flat and not allowed(k)]
  shapes = [f"{k}: checkpoint {tuple(restored[k].shape)} vs model {_leaf_shape(init_flat[k])}"
            for k in init_flat if k in restored and not allowed(k)
            and tuple(restored[k].shape) != _leaf_shape(init_flat[k])]
  for title, items in (("missing from the checkpoint", missing),
                       ("unexpected (not in the model)", unexpected),
                       ("with different shapes", shapes)):
    if items:
      lines.append(f"  {len(items)} key(s) {title}: " + "; ".join(items[:8])
                   + (f"; ... ({len(items) - 8} more)" if len(items) > 8 else ""))
  return lines


def read_params(path) -> dict:
  """Params from an `.npz` file or an Orbax directory (see `restore_params`), as numpy."""
  path = epath.Path(path)
  if path.is_dir():
    # Same layouts as .npz files (e.g. scanned blocks, a 'params' level).
    return unflatten(normalize_npz(flatten(restore_params(path))))
  if not path.exists():
    raise FileNotFoundError(f"No checkpoint at {path} (expected an .npz file or an Orbax "
                            "directory).")
  return load_npz(path)


def load_pretrained(path, init_params, model_config, *, resample: str = "zoom",
                    allow_mismatch: Sequence[str] = ()) -> dict:
  """A pre-trained checkpoint adapted to the model `init_params` belongs to.

  Args:
    path: an `.npz` file (any published layout) or an Orbax directory (`save_params`
      output, a TrainCheckpointer directory (latest step) or one of its step directories).
    init_params: the new model's freshly initialised params (arrays or
      jax.ShapeDtypeStruct; optionally under 'params'). The head always comes from here
      (zero-initialised for the new classes); leaves with a sharding are returned on it.
    model_config: the new model's config (`representation_size`: pre_logits is kept when
      set, dropped when None).
    resample: position-embedding resampling when the grid differs: 'zoom' (the
      reference), 'bilinear' (timm's npz loader), 'bicubic' (HF). Class token kept apart.
    allow_mismatch: fnmatch patterns of keys that may be missing/unexpected/mis-shaped;
      those take the value from init_params.
  Returns the new params, in init_params' structure (per-layer or scanned).
  Raises CheckpointError listing every missing, unexpected and mis-shaped key.
  """
  wrapped = set(init_params) == {"params"}
  init = init_params["params"] if wrapped else init_params
  scanned = "encoderblock" in init.get("Transformer", {})
  init_flat = flatten(_unstack_abstract(init) if scanned else init)
  restored = flatten(read_params(path))
  for key in [k for k in restored if k.startswith("head/")]:
    del restored[key]
  if _cfg(model_config, "representation_size") is None:
    for key in [k for k in restored if k.startswith("pre_logits/")]:
      del restored[key]
  _adapt_posemb(restored, init_flat, resample)
  problems = _mismatch_report(restored, init_flat,
                              tuple(allow_mismatch) + ("head/*",))
  if problems:
    raise CheckpointError(
        f"Checkpoint {path} does not fit the model {_cfg(model_config, 'name', '')}:\n"
        + "\n".join(problems) + "\nCheck that the model config matches the checkpoint "
        "(size, patch, classifier, representation_size), or pass allow_mismatch=[patterns] "
        "for keys that should keep their fresh initialisation.")
  params = {k: place_like(restored[k], like) if k in restored and
            tuple(restored[k].shape) == _leaf_shape(like) else _fresh(k, like, model_config)
            for k, like in init_flat.items()}
  params = unflatten(params)
  if scanned:
    params = _stack_blocks(params, init)
  return {"params": params} if wrapped else params


def _fresh(key: str, like, model_config):
  """init_params' own value; for an abstract head, the reference's zero-kernel head."""
  if not isinstance(like, jax.ShapeDtypeStruct):
    return like
  if key == "head/kernel":
    return place_like(np.zeros(like.shape), like)
  if key == "head/bias":
    return place_like(np.full(like.shape, _cfg(model_config, "head_bias_init", 0.0)), like)
  raise CheckpointError(f"'{key}' is not taken from the checkpoint, and init_params only "
                        "gives its shape: pass initialised (concrete) init_params.")


def _unstack_abstract(params):
  """Per-layer view of a scanned tree whose leaves may be ShapeDtypeStructs."""
  stacked = params["Transformer"]["encoderblock"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  blocks = {f"encoderblock_{i}": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked) for i in range(n)}
  rest = {k: v for k, v in params["Transformer"].items() if k != "encoderblock"}
  return {**params, "Transformer": {**rest, **blocks}}


def _stack_blocks(params, init):
  """Per-layer params -> the scanned layout, leaves placed like `init`'s."""
  n = jax.tree.leaves(init["Transformer"]["encoderblock"])[0].shape[0]
  blocks = [params["Transformer"].pop(f"encoderblock_{i}") for i in range(n)]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
  params["Transformer"]["encoderblock"] = jax.tree.map(
      place_like, stacked, init["Transformer"]["encoderblock"])
  return params


__all__ = ["CheckpointError", "RESAMPLE_METHODS", "TrainCheckpointer", "flatten",
           "load_npz", "load_pretrained", "normalize_npz", "read_npz", "read_params",
           "resample_grid", "resample_posemb", "restore_params", "save_npz", "save_params",
           "unflatten"]
