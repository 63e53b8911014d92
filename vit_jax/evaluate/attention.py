"""Attention analyses of the paper (Section 4.5): mean attention distance and rollout maps.

Attention weights are the model's `intermediates` (`attention_weights`, one array
[batch, heads, tokens, tokens] per block); tokens are `num_prefix_tokens` class tokens
followed by the patch grid in row-major order.
"""

import jax
import numpy as np


def collect_attention(model, variables, images) -> np.ndarray:
  """Attention weights of every block: [layers, batch, heads, tokens, tokens].

  Works for unrolled (`encoderblock_{i}`) and scanned (`encoderblock`) models.
  """
  _, state = model.apply(variables, images, mutable="intermediates")
  transformer = state["intermediates"]["Transformer"]
  if "encoderblock" in transformer:  # Scanned: one array with a leading layer axis.
    return np.asarray(transformer["encoderblock"]["MultiHeadDotProductAttention_0"]
                      ["attention_weights"][0])
  blocks = sorted((k for k in transformer if k.startswith("encoderblock_")),
                  key=lambda k: int(k.split("_")[1]))
  return np.stack([np.asarray(transformer[k]["MultiHeadDotProductAttention_0"]
                              ["attention_weights"][0]) for k in blocks])


def patch_distances(grid: tuple[int, int], patch_size: float) -> np.ndarray:
  """Euclidean distance in pixels between patch centres: [patches, patches]."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  centres = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1) * patch_size
  return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(weights, grid: tuple[int, int], patch_size: float,
                            num_prefix_tokens: int = 1) -> np.ndarray:
  """Average pixel distance that each head attends across (the paper's Figure 7, right).

  Args:
    weights: [..., heads, tokens, tokens] attention weights (e.g. [layers, batch, ...]).
  Returns:
    [..., heads] distances: for each patch query, the attention-weighted mean distance to
    the patch keys (weights renormalised over patches, class tokens left out), averaged
    over queries and, where present, the batch axis is kept (average it yourself).
  """
  weights = np.asarray(weights, np.float64)
  patches = weights[..., num_prefix_tokens:, num_prefix_tokens:]
  patches = patches / patches.sum(axis=-1, keepdims=True)
  per_query = (patches * patch_distances(grid, patch_size)).sum(axis=-1)
  return per_query.mean(axis=-1)


def attention_rollout(weights, num_prefix_tokens: int = 1) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema, 2020), as used for the paper's Figure 6.

  Args:
    weights: [layers, batch, heads, tokens, tokens].
  Returns:
    [batch, patches] how much the first class token draws on each patch, through all
    layers (heads averaged, the residual path counted as an identity half).
  """
  weights = np.asarray(weights, np.float64).mean(axis=2)  # [layers, batch, tokens, tokens]
  eye = np.eye(weights.shape[-1])
  rollout = np.broadcast_to(eye, weights.shape[1:]).copy()
  for layer in weights:
    mixed = 0.5 * layer + 0.5 * eye
    mixed /= mixed.sum(axis=-1, keepdims=True)
    rollout = mixed @ rollout
  if num_prefix_tokens == 0:  # No class token: average over the patch queries.
    return rollout.mean(axis=1)
  return rollout[:, 0, num_prefix_tokens:]


def upsample_map(values, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
  """[batch, patches] -> [batch, height, width] by bilinear resize, scaled to [0, 1]."""
  maps = np.asarray(values).reshape((-1,) + tuple(grid))
  maps = np.asarray(jax.image.resize(maps, (maps.shape[0],) + tuple(size), "bilinear"))
  low = maps.min(axis=(1, 2), keepdims=True)
  high = maps.max(axis=(1, 2), keepdims=True)
  return (maps - low) / np.maximum(high - low, 1e-12)
