"""Figure 7 (left) of the ViT paper: principal components of the patch-embedding filters.

Each of the d filters of `embedding/kernel` [p, p, 3, d] is one point in R^(p*p*3); the
principal components of these d points (centred across filters), shown as p x p RGB
tiles, look like plausible basis functions for the fine structure within a patch.
"""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def embedding_filter_components(kernel, num: int = 28):
  """PCA of the embedding filters: kernel [p, p, c, d] -> (components, explained ratio).

  components [num, p, p, c]: unit-norm principal directions, largest variance first; each
  sign fixed so that its largest-magnitude entry is positive (PCA leaves it open).
  explained_variance_ratio [num]: each component's share of the filters' total variance.
  """
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 4:
    raise ValueError(f"Expected a patch-embedding kernel [patch, patch, channels, filters] "
                     f"(HWIO), got shape {kernel.shape}.")
  p_h, p_w, channels, num_filters = kernel.shape
  size = p_h * p_w * channels
  if not 1 <= num <= min(num_filters, size):
    raise ValueError(f"Cannot take {num} principal components of {num_filters} filters of "
                     f"size {p_h}x{p_w}x{channels}: num must be in [1, "
                     f"{min(num_filters, size)}].")
  filters = kernel.reshape(size, num_filters).T  # [d, p*p*c], one filter per row.
  centred = filters - filters.mean(axis=0, keepdims=True)
  _, singular, directions = np.linalg.svd(centred, full_matrices=False)
  total = np.sum(singular**2)
  if total == 0:
    raise ValueError("All embedding filters are equal: they have no principal components.")
  directions = directions[:num]
  largest = np.argmax(np.abs(directions), axis=1)
  directions *= np.sign(directions[np.arange(num), largest])[:, None]
  return directions.reshape(num, p_h, p_w, channels), singular[:num]**2 / total


def rescale_for_display(tile):
  """Each tile to [0, 1] by its own min and max (a constant tile becomes 0.5 grey)."""
  tile = np.asarray(tile, np.float64)
  low, high = tile.min(), tile.max()
  if high == low:
    return np.full_like(tile, 0.5)
  return (tile - low) / (high - low)


def filter_grid_size(num: int, patch: int, columns: int = 7, scale: int = 4,
                     gap: int = 2) -> tuple[int, int]:
  """(height, width) in pixels of the PNG `plot_embedding_filters` writes."""
  rows = math.ceil(num / columns)
  columns = min(columns, num)
  tile = patch * scale
  return rows * tile + (rows + 1) * gap, columns * tile + (columns + 1) * gap


def plot_embedding_filters(components, path: str, columns: int = 7, scale: int = 4,
                           gap: int = 2) -> str:
  """Writes the components [n, p, p, 3 or 1] as a PNG grid of tiles; returns `path`.

  Each tile is rescaled to [0, 1] on its own and magnified `scale` times (nearest
  neighbour, no smoothing), on a white background with `gap` pixels between tiles; the
  image has exactly `filter_grid_size(n, p, columns, scale, gap)` pixels. 4 rows of 7 for
  the paper's 28 components.
  """
  components = np.asarray(components)
  if components.ndim != 4 or components.shape[1] != components.shape[2] or \
      components.shape[3] not in (1, 3):
    raise ValueError(f"Expected components [n, patch, patch, 3] (RGB) or [..., 1], got "
                     f"shape {components.shape}.")
  if min(columns, scale) < 1 or gap < 0:
    raise ValueError(f"columns and scale must be >= 1 and gap >= 0, got {columns}, "
                     f"{scale}, {gap}.")
  num, patch = components.shape[:2]
  height, width = filter_grid_size(num, patch, columns, scale, gap)
  canvas = np.ones((height, width, 3))
  tile = patch * scale
  for i, component in enumerate(components):
    image = rescale_for_display(component)
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    top = gap + (i // columns) * (tile + gap)
    left = gap + (i % columns) * (tile + gap)
    canvas[top:top + tile, left:left + tile] = image  # Grey tiles broadcast to RGB.
  matplotlib.image.imsave(path, canvas, format="png")
  return path
