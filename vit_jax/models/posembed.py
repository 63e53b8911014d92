"""Position embeddings for the paper's ablation (Table 8, Appendix D.4).

Every additive variant maps tokens `[batch, tokens, dim]` to the same shape. The token
sequence is an optional class token followed by the patch grid in row-major order.
"""

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

ADDITIVE_TYPES = ("learn", "learn_2d", "sincos2d")
POSEMB_TYPES = ADDITIVE_TYPES + ("relative", "none")


def check_posemb_type(posemb: str) -> None:
  if posemb not in POSEMB_TYPES:
    raise ValueError(
        f"Unknown position embedding type {posemb!r}; choose one of {POSEMB_TYPES}.")


def _grid_mismatch_error(name, stored, wanted):
  return ValueError(
      f"Position embedding {name!r} has shape {tuple(stored)} but this input needs "
      f"{tuple(wanted)}: the image resolution differs from the one the parameters were "
      "made for. Resample them with vit_jax.models.resample_posemb (or load with "
      "vit_jax.checkpoints.load_pretrained, which does it for you).")


class AddPositionEmbs(nn.Module):
  """Learned 1-D position embeddings over the whole sequence (the reference default).

  Parameter `pos_embedding`: [1, tokens, dim], normal(stddev=0.02).
  """
  posemb_init: Callable = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x):
    shape = (1, x.shape[1], x.shape[2])
    if self.has_variable("params", "pos_embedding"):
      stored = self.get_variable("params", "pos_embedding").shape
      if tuple(stored) != shape:
        raise _grid_mismatch_error("pos_embedding", stored, shape)
    pe = self.param("pos_embedding", self.posemb_init, shape)
    return x + pe.astype(x.dtype)


class AddFactorizedPositionEmbs(nn.Module):
  """Learned 2-D factorised embeddings: a row table and a column table of dim/2 each.

  The embedding of patch (r, c) is concat(row[r], col[c]); a class token, if present,
  gets its own learned `pos_embedding_cls` [1, 1, dim].
  """
  grid: tuple[int, int]
  num_prefix_tokens: int
  posemb_init: Callable = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x):
    rows, cols = self.grid
    dim = x.shape[-1]
    if dim % 2:
      raise ValueError(f"learn_2d position embeddings need an even width, got {dim}.")
    row = self.param("pos_embedding_row", self.posemb_init, (1, rows, dim // 2))
    col = self.param("pos_embedding_col", self.posemb_init, (1, cols, dim // 2))
    if row.shape[1] != rows or col.shape[1] != cols:
      raise _grid_mismatch_error("pos_embedding_row/col", (row.shape[1], col.shape[1]),
                                 (rows, cols))
    grid = jnp.concatenate([
        jnp.broadcast_to(row[:, :, None, :], (1, rows, cols, dim // 2)),
        jnp.broadcast_to(col[:, None, :, :], (1, rows, cols, dim // 2)),
    ], axis=-1).reshape(1, rows * cols, dim)
    if self.num_prefix_tokens:
      cls = self.param("pos_embedding_cls", self.posemb_init, (1, 1, dim))
      grid = jnp.concatenate([cls, grid], axis=1)
    return x + grid.astype(x.dtype)


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sin-cos embeddings [rows * cols, dim] (a quarter of dim per sin/cos of y/x)."""
  if dim % 4:
    raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {dim}.")
  rows, cols = grid
  y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  omega = 1. / temperature**(np.arange(dim // 4) / (dim // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class AddSinCosPositionEmbs(nn.Module):
  """Fixed 2-D sin-cos embeddings (no parameters); a class token gets zeros."""
  grid: tuple[int, int]
  num_prefix_tokens: int

  def __call__(self, x):
    pe = sincos_2d(self.grid, x.shape[-1])
    pe = np.concatenate([np.zeros((self.num_prefix_tokens, x.shape[-1]), np.float32), pe])
    return x + jnp.asarray(pe, x.dtype)[None]


def relative_offset_index(grid: tuple[int, int], num_prefix_tokens: int) -> np.ndarray:
  """Index of the 2-D offset between every query and key token: int32 [tokens, tokens].

  Patch pairs get indices in [0, (2*rows-1)*(2*cols-1)); any pair involving a prefix
  (class) token gets the one extra index after those.
  """
  rows, cols = grid
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  r, c = r.reshape(-1), c.reshape(-1)
  dr = r[:, None] - r[None, :] + rows - 1
  dc = c[:, None] - c[None, :] + cols - 1
  patch_index = dr * (2 * cols - 1) + dc
  num_offsets = (2 * rows - 1) * (2 * cols - 1)
  n = num_prefix_tokens + rows * cols
  index = np.full((n, n), num_offsets, np.int32)
  index[num_prefix_tokens:, num_prefix_tokens:] = patch_index
  return index


class RelativeLogits(nn.Module):
  """Relative attention (Appendix D.4): a learned embedding per query-key offset.

  Each query is dotted with the embedding of its offset to each key; the resulting
  logits [batch, heads, q_tokens, k_tokens] are added to the attention logits as a bias.
  Parameter `relative_embedding`: [offsets + 1, heads, head_dim].
  """
  grid: tuple[int, int]
  num_prefix_tokens: int

  @nn.compact
  def __call__(self, query):
    """query: [batch, tokens, heads, head_dim] -> bias [batch, heads, tokens, tokens]."""
    rows, cols = self.grid
    num_offsets = (2 * rows - 1) * (2 * cols - 1) + 1
    table = self.param("relative_embedding", nn.initializers.normal(stddev=0.02),
                       (num_offsets, query.shape[2], query.shape[3]))
    if table.shape[0] != num_offsets:
      raise _grid_mismatch_error("relative_embedding", table.shape,
                                 (num_offsets,) + table.shape[1:])
    logits_per_offset = jnp.einsum("bqhd,ohd->bhqo", query, table.astype(query.dtype))
    index = relative_offset_index(self.grid, self.num_prefix_tokens)
    return jnp.take_along_axis(
        logits_per_offset,
        jnp.broadcast_to(index, logits_per_offset.shape[:2] + index.shape), axis=-1)
