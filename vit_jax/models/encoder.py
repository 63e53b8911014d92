"""The pre-LN Transformer encoder: `Transformer/{posembed_input, encoderblock_i, encoder_norm}`."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import params as names
from vit_jax.models import posembed
from vit_jax.models.attention import SelfAttention

REMAT_POLICIES = ("none",) + tuple(
    name for name in dir(jax.checkpoint_policies)
    if name.endswith("saveable") or name.startswith("checkpoint_dots"))


def remat_policy(name: str):
  """The `jax.checkpoint_policies` member called `name`, or None for 'none'."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {name!r}; choose one of {REMAT_POLICIES}.")
  return None if name == "none" else getattr(jax.checkpoint_policies, name)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(dim) -> dropout, on [batch, tokens, dim]."""
  mlp_dim: int
  dropout_rate: float = 0.0
  approximate_gelu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    out_dim = x.shape[-1]
    x = dense(self.mlp_dim, names.MLP_DENSE[0])(x)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, names.MLP_DENSE[1])(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class DropPath(nn.Module):
  """Stochastic depth: zeroes a residual branch for a random subset of examples."""
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if self.rate == 0.0 or deterministic:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class EncoderBlock(nn.Module):
  """x + MHSA(LN(x)), then + MLP(LN(.)); [batch, tokens, dim] -> same.

  With `scanned`, takes and returns a (carry, None) pair for `nn.scan`.
  Sows the block's output as `block_output` when 'intermediates' is mutable.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  approximate_gelu: bool = True
  attention_impl: str = "auto"
  relative_grid: Optional[tuple[int, int]] = None
  num_prefix_tokens: int = 0
  deterministic: bool = True
  scanned: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, _=None):
    det = self.deterministic
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=names.ATTENTION_NORM)(x)
    y = SelfAttention(self.num_heads, self.attention_dropout_rate, self.attention_impl,
                      self.relative_grid, self.num_prefix_tokens, dtype=self.dtype,
                      name=names.ATTENTION)(y, deterministic=det)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=det)
    x = x + DropPath(self.stochastic_depth)(y, deterministic=det)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=names.MLP_NORM)(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.approximate_gelu,
                 dtype=self.dtype, name=names.MLP)(y, deterministic=det)
    x = x + DropPath(self.stochastic_depth)(y, deterministic=det)
    self.sow("intermediates", "block_output", x)
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final LayerNorm.

  Input and output: [batch, tokens, dim], tokens = num_prefix_tokens + rows * cols.
  With `scan`, the blocks are one `nn.scan` named `encoderblock` whose parameters carry a
  leading layer axis (big_vision's layout); otherwise `encoderblock_{i}` (the reference).
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  grid: tuple[int, int]
  num_prefix_tokens: int
  posemb: str = "learn"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  approximate_gelu: bool = True
  attention_impl: str = "auto"
  scan: bool = False
  remat_policy: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = self._add_position_embeddings(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    block = self._block_class()
    kwargs = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth, approximate_gelu=self.approximate_gelu,
        attention_impl=self.attention_impl,
        relative_grid=self.grid if self.posemb == "relative" else None,
        num_prefix_tokens=self.num_prefix_tokens, deterministic=not train, dtype=self.dtype)
    if self.scan:
      layers = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                       split_rngs={"params": True, "dropout": True}, length=self.num_layers)
      x, _ = layers(scanned=True, name=names.SCANNED_BLOCK, **kwargs)(x, None)
    else:
      for i in range(self.num_layers):
        x = block(name=names.block_name(i), **kwargs)(x)
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=names.ENCODER_NORM)(x)

  def _block_class(self):
    policy = remat_policy(self.remat_policy)
    if self.remat_policy == "none":
      return EncoderBlock
    return nn.remat(EncoderBlock, policy=policy, prevent_cse=not self.scan)

  def _add_position_embeddings(self, x):
    posembed.check_posemb_type(self.posemb)
    if self.posemb == "learn":
      return posembed.AddPositionEmbs(name=names.POSEMB_MODULE)(x)
    if self.posemb == "learn_2d":
      return posembed.AddFactorizedPositionEmbs(self.grid, self.num_prefix_tokens,
                                                name=names.POSEMB_MODULE)(x)
    if self.posemb == "sincos2d":
      return posembed.AddSinCosPositionEmbs(self.grid, self.num_prefix_tokens)(x)
    return x  # 'relative' acts inside attention; 'none' adds nothing.
