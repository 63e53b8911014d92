"""PNG figures of the analyses, in the style of the paper's Figures 6 and 7."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def plot_attention_maps(images, maps, path: str, titles=None) -> str:
  """Input images (row 1) and their rollout maps over them (row 2).

  images: [n, h, w, 3] in [-1, 1] or [0, 255]; maps: [n, h, w] in [0, 1].
  """
  images = np.asarray(images, np.float32)
  if images.min() < 0:
    images = (images + 1) / 2
  elif images.max() > 1:
    images = images / 255.0
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
  for i in range(n):
    axes[0, i].imshow(np.clip(images[i], 0, 1))
    axes[1, i].imshow(np.clip(images[i], 0, 1))
    axes[1, i].imshow(maps[i], cmap="inferno", alpha=0.6)
    if titles is not None:
      axes[0, i].set_title(str(titles[i]), fontsize=9)
    for ax in axes[:, i]:
      ax.axis("off")
  fig.suptitle("Attention rollout from the class token")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_attention_distance(distances, path: str) -> str:
  """Mean attention distance per head (dots) against layer depth. distances: [layers, heads]."""
  distances = np.asarray(distances)
  fig, ax = plt.subplots(figsize=(5, 4))
  for layer, row in enumerate(distances):
    ax.scatter(np.full(row.shape, layer), row, s=14, color="tab:blue")
  ax.set_xlabel("network depth (layer)")
  ax.set_ylabel("mean attention distance (pixels)")
  ax.set_title("Attention distance per head")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_posemb_similarity(similarity, path: str) -> str:
  """A grid of cosine-similarity maps, one per patch. similarity: [rows, cols, rows, cols]."""
  rows, cols = similarity.shape[:2]
  fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 1, 1.1 * rows), squeeze=False)
  for i in range(rows):
    for j in range(cols):
      image = axes[i, j].imshow(similarity[i, j], vmin=-1, vmax=1, cmap="viridis")
      axes[i, j].axis("off")
  fig.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity")
  fig.suptitle("Position embedding similarity")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
