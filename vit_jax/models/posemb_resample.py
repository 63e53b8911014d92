"""Resampling learned position embeddings to another patch grid (higher-resolution
fine-tuning, paper Sec. 3.2: 2-D interpolation of the pre-trained embeddings).
"""

import numpy as np
import scipy.ndimage

RESAMPLE_METHODS = ("zoom", "bilinear", "bicubic")


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


def check_method(method: str) -> None:
  if method not in RESAMPLE_METHODS:
    raise ValueError(f"Unknown resampling method {method!r}; choose one of {RESAMPLE_METHODS}.")


def resample_grid(grid: np.ndarray, new_grid: tuple[int, int], method: str = "zoom"):
  """[rows, cols, dim] -> [new_rows, new_cols, dim] by `method` (see RESAMPLE_METHODS).

  'zoom' is the reference: scipy.ndimage.zoom(order=1), whose samples include both
  corners; 'bilinear' and 'bicubic' follow torch's interpolate (align_corners=False).
  """
  check_method(method)
  rows, cols, _ = grid.shape
  if method == "zoom":
    return scipy.ndimage.zoom(grid, (new_grid[0] / rows, new_grid[1] / cols, 1), order=1)
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
    raise ValueError(
        f"Cannot resample position embeddings: {grid.shape[0]} grid tokens (after "
        f"{num_prefix_tokens} prefix tokens) do not form a square grid.")
  grid = resample_grid(grid.reshape(side, side, -1), tuple(new_grid), method)
  return np.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)
