"""Position-embedding similarity (the paper's Figure 7, centre)."""

import numpy as np


def posemb_similarity(pos_embedding, grid: tuple[int, int], num_prefix_tokens: int = 1):
  """Cosine similarity of every patch's embedding to every other patch's.

  Args:
    pos_embedding: [1, tokens, dim] or [tokens, dim], class tokens first.
  Returns:
    [rows, cols, rows, cols]: entry [i, j] is the similarity map of patch (i, j).
  """
  pe = np.asarray(pos_embedding, np.float64).reshape(-1, np.shape(pos_embedding)[-1])
  pe = pe[num_prefix_tokens:]
  if pe.shape[0] != grid[0] * grid[1]:
    raise ValueError(f"{pe.shape[0]} patch embeddings do not form a {grid[0]}x{grid[1]} grid.")
  unit = pe / np.maximum(np.linalg.norm(pe, axis=-1, keepdims=True), 1e-12)
  return (unit @ unit.T).reshape(grid[0], grid[1], grid[0], grid[1])
