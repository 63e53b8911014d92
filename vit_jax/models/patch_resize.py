"""Changing a ViT's patch size: FlexiViT's PI-resize of the patch-embedding kernel.

A token is <x, w> for a patch x [p, p, c] and a kernel column w (Beyer et al. 2023,
"FlexiViT", Sec. 3.4). Resizing patches is linear, x -> B x, with B [q*q, p*p] whose
column i is the resize of the i-th one-hot p x p image (bilinear, half-pixel centres,
antialiased when shrinking, as jax.image.resize). The kernel that keeps every token,
<B x, w'> = <x, w>, solves B^T w' = w; its least-norm solution is w' = pinv(B^T) w.
Growing patches (q >= p) B^T has full row rank and this is exact; shrinking them it is
the least-squares best and tokens are only approximately kept.

`change_patch_size` applies it to a whole checkpoint: the embedding kernel and the
learned position-embedding grid (one row per patch of the image).
"""

from typing import Any

import numpy as np

from vit_jax.models import params as names
from vit_jax.models.posemb_resample import resample_posemb

RESIZE_METHODS = ("pinv", "bilinear")
EMBEDDING_KEY = f"{names.EMBEDDING}/kernel"
POSEMB_KEY = names.POSEMB


def _triangle(t):
  return np.maximum(0.0, 1.0 - np.abs(t))


def bilinear_matrix(size: int, new_size: int) -> np.ndarray:
  """[new_size, size] 1-D linear resize: half-pixel centres, edges clamped, antialiased
  (triangle widened by size / new_size) when shrinking; the rows sum to one."""
  scale = new_size / size
  centres = (np.arange(new_size) + 0.5) / scale - 0.5  # Output samples in input pixels.
  weights = _triangle((np.arange(size)[None, :] - centres[:, None]) * min(scale, 1.0))
  return weights / weights.sum(axis=1, keepdims=True)


def resize_images(images: np.ndarray, new_size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of [height, width, ...] (leading two axes) to new_size, in float64."""
  rows = bilinear_matrix(images.shape[0], new_size[0])
  cols = bilinear_matrix(images.shape[1], new_size[1])
  return np.einsum("ih,hw...,jw->ij...", rows, np.asarray(images, np.float64), cols)


def patch_resize_matrix(size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
  """B [new_h * new_w, h * w]: row-major flattened patch -> flattened resized patch.

  Column i is the resized i-th basis image; the resize is separable, so B is the
  Kronecker product of the row and column resize matrices.
  """
  return np.kron(bilinear_matrix(size[0], new_size[0]), bilinear_matrix(size[1], new_size[1]))


def _check_size(new_size) -> tuple[int, int]:
  if isinstance(new_size, (int, np.integer)):
    new_size = (new_size, new_size)
  new_size = tuple(new_size)
  if len(new_size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0
                                   for s in new_size):
    raise ValueError(f"new_size must be two positive integers (height, width), got "
                     f"{new_size!r}.")
  return int(new_size[0]), int(new_size[1])


def resize_patch_kernel(kernel, new_size, method: str = "pinv") -> np.ndarray:
  """Patch-embedding kernel [p, p, c, d] -> [q, q, c, d] for patches of new_size (q, q).

  'pinv': w' = pinv(B^T) w per input channel and output unit, so that tokens of resized
  patches equal the old tokens (exactly when q >= p). 'bilinear': the kernel itself is
  resized like an image (tokens then change, roughly by the area ratio (q/p)^2).
  Computed in float64; returned in the kernel's dtype.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 4:
    raise ValueError(f"Expected a patch-embedding kernel [patch_h, patch_w, in_channels, "
                     f"dim] (HWIO), got shape {kernel.shape}.")
  if method not in RESIZE_METHODS:
    raise ValueError(f"Unknown patch-kernel resize method {method!r}; choose one of "
                     f"{RESIZE_METHODS}.")
  new_size = _check_size(new_size)
  h, w, c, d = kernel.shape
  if method == "bilinear":
    return resize_images(kernel, new_size).astype(kernel.dtype)
  resize = patch_resize_matrix((h, w), new_size)  # [q*q, p*p]
  flat = kernel.astype(np.float64).reshape(h * w, c * d)
  new = np.linalg.pinv(resize.T) @ flat
  return new.reshape(new_size + (c, d)).astype(kernel.dtype)


def _grid_side(image_size: int, patch: int, what: str) -> int:
  if image_size % patch:
    raise ValueError(f"Image size {image_size} is not divisible by the {what} patch size "
                     f"{patch}: the patches must tile the image; pick a divisor of "
                     f"{image_size}.")
  return image_size // patch


def change_patch_size(params, new_patch: int, image_size: int, *, method: str = "pinv",
                      posemb_method: str = "zoom") -> Any:
  """A plain-ViT checkpoint for patch size `new_patch` at square `image_size`.

  params: our parameter tree, nested or flat ('/'-joined keys), in the reference layout
  (`embedding/kernel` [p, p, c, d]; learned `Transformer/posembed_input/pos_embedding`
  [1, prefix + (image_size // p)**2, d], prefix 1 with a `cls` token). The kernel is
  resized by `resize_patch_kernel(method)`, the position-embedding grid resampled to
  image_size // new_patch per side by `resample_posemb(posemb_method)` (the
  class-token row kept). Other parameters are returned unchanged; same form as given.
  """
  is_flat = EMBEDDING_KEY in params
  flat = dict(params) if is_flat else names.flatten(params)
  if EMBEDDING_KEY not in flat:
    raise ValueError(f"No {EMBEDDING_KEY!r} in the parameters; expected a ViT tree in the "
                     "reference layout (normalise published .npz files with "
                     "checkpoints.load_npz).")
  if any(k.startswith("conv_root/") for k in flat):
    raise ValueError("change_patch_size is for plain ViTs; a hybrid's embedding patches "
                     "the ResNet feature map, not the image.")
  if not isinstance(new_patch, (int, np.integer)) or new_patch < 1:
    raise ValueError(f"new_patch must be a positive integer, got {new_patch!r}.")
  kernel = np.asarray(flat[EMBEDDING_KEY])
  old_patch = kernel.shape[0]
  if kernel.ndim != 4 or kernel.shape[1] != old_patch:
    raise ValueError(f"Expected a square patch-embedding kernel [p, p, c, d], got "
                     f"{kernel.shape}.")
  old_side = _grid_side(image_size, old_patch, "old")
  new_side = _grid_side(image_size, new_patch, "new")
  flat[EMBEDDING_KEY] = resize_patch_kernel(kernel, (new_patch, new_patch), method)
  if POSEMB_KEY in flat:
    posemb = np.asarray(flat[POSEMB_KEY])
    prefix = 1 if names.CLS in flat else 0
    if posemb.shape[1] != prefix + old_side**2:
      raise ValueError(
          f"The position embeddings have {posemb.shape[1]} rows, but {prefix} prefix "
          f"token(s) and a {old_side}x{old_side} grid (image_size {image_size} / patch "
          f"{old_patch}) need {prefix + old_side**2}; pass the image_size the checkpoint "
          "was trained at.")
    flat[POSEMB_KEY] = resample_posemb(posemb, (new_side, new_side), prefix,
                                                  posemb_method).astype(posemb.dtype)
  elif any(k.startswith(f"{names.TRANSFORMER}/{names.POSEMB_MODULE}/") for k in flat):
    raise ValueError("Only learned 1-D position embeddings ('learn') are resampled; this "
                     "checkpoint has other posembed_input parameters.")
  return flat if is_flat else names.unflatten(flat)
