"""Fine-tuning loads: a pre-trained checkpoint adapted to a new model.

The head is replaced by the new model's fresh (zero) head, `pre_logits` is dropped when
the new model has none, position embeddings are resampled to the new patch grid, a
different patch size is bridged by FlexiViT's PI-resize when asked (`patch_resize`), and
every other mismatch is reported at once.
"""

import fnmatch
from typing import Optional, Sequence

import jax
import numpy as np
from etils import epath

from vit_jax.checkpoints.arrays import place_like
from vit_jax.checkpoints.errors import CheckpointError
from vit_jax.checkpoints.npz import load_npz, normalize_npz
from vit_jax.checkpoints.orbax_io import restore_params
from vit_jax.models import params as names
from vit_jax.models import patch_resize as patch_resize_lib
from vit_jax.models import posemb_resample

EMBEDDING_KERNEL = f"{names.EMBEDDING}/kernel"


def read_params(path) -> dict:
  """Params from an `.npz` file or an Orbax directory (see `restore_params`), as numpy."""
  path = epath.Path(path)
  if path.is_dir():
    # Same layouts as .npz files (e.g. scanned blocks, a 'params' level).
    return names.unflatten(normalize_npz(names.flatten(restore_params(path))))
  if not path.exists():
    raise FileNotFoundError(f"No checkpoint at {path} (expected an .npz file or an Orbax "
                            "directory).")
  return load_npz(path)


def _field(config, name):
  return config.get(name) if hasattr(config, "get") else getattr(config, name)


def _leaf_shape(leaf) -> tuple:
  return tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)


def _adapt_posemb(restored: dict, init_flat: dict, method: str) -> None:
  """Resamples `restored`'s position embeddings (in place) to the grid of `init_flat`."""
  if names.POSEMB not in restored or names.POSEMB not in init_flat:
    return
  old, new = restored[names.POSEMB], init_flat[names.POSEMB]
  new_shape = _leaf_shape(new)
  if tuple(old.shape) == new_shape or old.shape[-1] != new_shape[-1]:
    return  # Same grid, or a width mismatch that the key check reports.
  old_prefix = 1 if names.CLS in restored else 0
  new_prefix = 1 if names.CLS in init_flat else 0
  grid_tokens = new_shape[1] - new_prefix
  side = int(round(np.sqrt(grid_tokens)))
  if side * side != grid_tokens:
    raise CheckpointError(f"The model's position embeddings {new_shape} are not a square "
                          "grid; resample them yourself with resample_posemb.")
  try:
    pe = posemb_resample.resample_posemb(old, (side, side), old_prefix, method)
  except ValueError as e:
    raise CheckpointError(f"The checkpoint's position embeddings {tuple(old.shape)}: {e}") from e
  if old_prefix and not new_prefix:
    pe = pe[:, 1:]  # The model has no class token: its embedding row is dropped.
  elif new_prefix and not old_prefix:
    pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
  restored[names.POSEMB] = pe


def _adapt_patch_size(restored: dict, init_flat: dict, model_config, method) -> None:
  """Resizes `restored`'s embedding kernel (in place) to the model's patch size.

  `method` is 'pinv' (FlexiViT's PI-resize) or 'bilinear' (`resize_patch_kernel`, what
  `change_patch_size` applies to the kernel); the learned position-embedding grid is then
  resampled once, from the checkpoint's grid straight to the model's, by `_adapt_posemb`.
  None leaves a different patch size to the mismatch report, as before.
  """
  if method is None or EMBEDDING_KERNEL not in restored or EMBEDDING_KERNEL not in init_flat:
    return
  old, new_shape = restored[EMBEDDING_KERNEL], _leaf_shape(init_flat[EMBEDDING_KERNEL])
  if len(new_shape) != 4 or tuple(old.shape) == new_shape or \
      tuple(old.shape[2:]) != new_shape[2:]:
    return  # Same patch, or other sizes differ: the mismatch report says so.
  if method not in patch_resize_lib.RESIZE_METHODS:
    raise CheckpointError(f"Unknown patch_resize {method!r}; choose one of "
                          f"{patch_resize_lib.RESIZE_METHODS} or None.")
  old_patch, new_patch = old.shape[0], new_shape[0]
  if any(k.startswith("conv_root/") for k in restored):
    raise CheckpointError("patch_resize is for plain ViTs: a hybrid's embedding patches the "
                          "ResNet feature map, not the image.")
  image_size = _field(model_config, "image_size")
  if image_size and image_size % new_patch:
    raise CheckpointError(
        f"Cannot change the patch size {old_patch} -> {new_patch}: the model's image size "
        f"{image_size} is not divisible by {new_patch}, so the patch grid would not be an "
        "integer; pick a patch size that divides the image size.")
  try:
    restored[EMBEDDING_KERNEL] = patch_resize_lib.resize_patch_kernel(
        old, new_shape[:2], method)
  except ValueError as e:
    raise CheckpointError(f"Cannot resize the embedding kernel {tuple(old.shape)} to "
                          f"{new_shape}: {e}") from e


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


def _patch_hint(restored: dict, init_flat: dict, patch_resize) -> str:
  old, new = restored.get(EMBEDDING_KERNEL), init_flat.get(EMBEDDING_KERNEL)
  if patch_resize is not None or old is None or new is None or \
      tuple(old.shape[:2]) == _leaf_shape(new)[:2]:
    return ""
  return (f"\nThe patch sizes differ ({old.shape[0]} vs {_leaf_shape(new)[0]}): pass "
          "patch_resize='pinv' (config.patch_resize) to resize the embedding.")


def _drop(flat: dict, top_level: str) -> None:
  for key in [k for k in flat if k.startswith(f"{top_level}/")]:
    del flat[key]


def load_pretrained(path, init_params, model_config, *, resample: str = "zoom",
                    allow_mismatch: Sequence[str] = (),
                    patch_resize: Optional[str] = None) -> dict:
  """A pre-trained checkpoint adapted to the model `init_params` belongs to.

  Args:
    path: an `.npz` file (any published layout) or an Orbax directory (`save_params`
      output, a TrainCheckpointer directory (latest step) or one of its step directories).
    init_params: the new model's freshly initialised params (arrays or
      jax.ShapeDtypeStruct; optionally under 'params'). The head always comes from here
      (zero-initialised for the new classes); leaves with a sharding are returned on it.
    model_config: the new model's config (`representation_size`: pre_logits is kept when
      set, dropped when None; `head_bias_init` for an abstract head; `name` for messages).
    resample: position-embedding resampling when the grid differs: 'zoom' (the
      reference), 'bilinear' (timm's npz loader), 'bicubic' (HF). Class token kept apart.
    allow_mismatch: fnmatch patterns of keys that may be missing/unexpected/mis-shaped;
      those take the value from init_params.
    patch_resize: when the checkpoint's patch size p differs from the model's q: 'pinv'
      (FlexiViT's PI-resize of the embedding kernel, tokens kept exactly when q >= p),
      'bilinear' (the kernel resized as an image), or None (an error, as any mismatch).
      Plain ViTs with learned 1-D position embeddings; the grid is resampled too.
  Returns the new params, in init_params' structure (per-layer or scanned).
  Raises CheckpointError listing every missing, unexpected and mis-shaped key.
  """
  wrapped = set(init_params) == {"params"}
  init = init_params["params"] if wrapped else init_params
  scanned = names.is_scanned(init)
  init_flat = names.flatten(names.scan_to_unrolled(init) if scanned else init)
  restored = names.flatten(read_params(path))
  _drop(restored, names.HEAD)
  if _field(model_config, "representation_size") is None:
    _drop(restored, names.PRE_LOGITS)
  _adapt_patch_size(restored, init_flat, model_config, patch_resize)
  _adapt_posemb(restored, init_flat, resample)
  problems = _mismatch_report(restored, init_flat, tuple(allow_mismatch) + (f"{names.HEAD}/*",))
  if problems:
    raise CheckpointError(
        f"Checkpoint {path} does not fit the model {_field(model_config, 'name')}:\n"
        + "\n".join(problems) + _patch_hint(restored, init_flat, patch_resize)
        + "\nCheck that the model config matches the checkpoint "
        "(size, patch, classifier, representation_size), or pass allow_mismatch=[patterns] "
        "for keys that should keep their fresh initialisation.")
  params = {k: place_like(restored[k], like) if k in restored and
            tuple(restored[k].shape) == _leaf_shape(like) else _fresh(k, like, model_config)
            for k, like in init_flat.items()}
  params = names.unflatten(params)
  if scanned:
    params = _stack_blocks(params, init)
  return {"params": params} if wrapped else params


def _fresh(key: str, like, model_config):
  """init_params' own value; for an abstract head, the reference's zero-kernel head."""
  if not isinstance(like, jax.ShapeDtypeStruct):
    return like
  if key == f"{names.HEAD}/kernel":
    return place_like(np.zeros(like.shape), like)
  if key == f"{names.HEAD}/bias":
    return place_like(np.full(like.shape, _field(model_config, "head_bias_init")), like)
  raise CheckpointError(f"'{key}' is not taken from the checkpoint, and init_params only "
                        "gives its shape: pass initialised (concrete) init_params.")


def _stack_blocks(params, init):
  """Per-layer params -> the scanned layout, leaves placed like `init`'s."""
  stacked = names.unrolled_to_scan(
      params, stack=lambda xs: np.stack([np.asarray(x) for x in xs]))
  blocks = stacked[names.TRANSFORMER][names.SCANNED_BLOCK]
  stacked[names.TRANSFORMER][names.SCANNED_BLOCK] = jax.tree.map(
      place_like, blocks, init[names.TRANSFORMER][names.SCANNED_BLOCK])
  return stacked
