"""Multi-head self-attention with the reference parameter layout.

Parameters (names and shapes as in Google's checkpoints):
  query/key/value: kernel [dim, heads, head_dim], bias [heads, head_dim]
  out:             kernel [heads, head_dim, dim], bias [dim]
The three input projections are computed as one fused matmul from the separate
parameters, so the checkpoint layout never changes.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import params as names
from vit_jax.models import posembed

ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn")


def resolve_impl(impl: str, dtype, has_bias: bool, backend: Optional[str] = None,
                 head_dim: int = 64) -> str:
  """The implementation 'auto' stands for; any other name is returned as it is.

  'auto' is 'cudnn' on a GPU in bfloat16 or float16 without relative-position logits and
  with a head size cuDNN's flash kernels take (a multiple of 8, at most 128; measured
  faster than timm there, see benchmarks/2026-11-26-h200.md), and 'xla' elsewhere (the
  explicit softmax, the fastest on the CPU).
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"Unknown attention impl {impl!r}; choose one of {ATTENTION_IMPLS}.")
  if impl != "auto":
    return impl
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  on_gpu = (backend or jax.default_backend()) == "gpu"
  flash_head = head_dim % 8 == 0 and head_dim <= 128
  return "cudnn" if on_gpu and half and flash_head and not has_bias else "xla"


class _Projection(nn.Module):
  """Declares a DenseGeneral-style kernel and bias and returns them, unapplied.

  The kernel's first `in_axes` axes are its fan-in, the rest its fan-out, as
  flax's DenseGeneral (and so the reference) initialises it with xavier_uniform.
  """
  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...]
  in_axes: int = 1

  @nn.compact
  def __call__(self):
    ndim = len(self.kernel_shape)
    init = nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=tuple(range(self.in_axes)),
        out_axis=tuple(range(self.in_axes, ndim)))
    kernel = self.param("kernel", init, self.kernel_shape)
    bias = self.param("bias", nn.initializers.zeros, self.bias_shape)
    return kernel, bias


class SelfAttention(nn.Module):
  """Multi-head self-attention: [batch, tokens, dim] -> [batch, tokens, dim].

  Attributes:
    num_heads: number of heads; dim must be divisible by it.
    dropout_rate: dropout on the attention weights (train only).
    impl: 'auto' (see `resolve_impl`), 'xla' (explicit softmax), 'dot_product'
      (jax.nn.dot_product_attention, XLA chooses), 'cudnn' (its flash kernel, GPU only,
      bf16/fp16; tokens padded to a multiple of 64 and masked, see
      `padded_dot_product_attention`).
    relative_grid: when set, adds relative-position logits (posemb 'relative').
  When the 'intermediates' collection is mutable, the attention weights
  [batch, heads, q_tokens, k_tokens] are sown as `attention_weights`.
  """
  num_heads: int
  dropout_rate: float = 0.0
  impl: str = "auto"
  relative_grid: Optional[tuple[int, int]] = None
  num_prefix_tokens: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"Width {dim} is not divisible by num_heads={self.num_heads}.")
    head_dim = dim // self.num_heads
    heads = (self.num_heads, head_dim)
    kernels, biases = zip(*[
        _Projection((dim,) + heads, heads, name=name)()
        for name in names.QKV])
    needs_weights = (self.is_mutable_collection("intermediates")
                     or (self.dropout_rate > 0 and not deterministic))
    impl = resolve_impl(self.impl, self.dtype, self.relative_grid is not None,
                        head_dim=head_dim)
    if impl == "xla" or needs_weights:
      out = self._explicit_attention(x, kernels, biases, deterministic)
    else:
      out = self._fused_attention(x, kernels, biases, impl)
    out_kernel, out_bias = _Projection(heads + (dim,), (dim,), in_axes=2, name=names.ATTENTION_OUT)()
    return (jnp.einsum("bhte,hed->btd", out, out_kernel.astype(self.dtype))
            + out_bias.astype(self.dtype))

  def _relative_bias(self, query):
    """Relative-position logits [batch, heads, q, k] for query [batch, tokens, heads, head_dim]."""
    if self.relative_grid is None:
      return None
    return posembed.RelativeLogits(self.relative_grid, self.num_prefix_tokens,
                                   name="relative")(query)

  def _explicit_attention(self, x, kernels, biases, deterministic):
    """Softmax attention with q, k, v computed heads-major: out [batch, heads, tokens, head_dim].

    One matmul projects to [3, batch, heads, tokens, head_dim], so both attention einsums
    are plain batched matmuls over (batch, heads) and XLA needs no transposes between them
    (measured faster on CPU than the [batch, tokens, heads, head_dim] layout).
    """
    qkv_kernel = jnp.stack(kernels).astype(self.dtype)  # [3, dim, heads, head_dim]
    qkv_bias = jnp.stack(biases).astype(self.dtype)[:, None, :, None, :]
    query, key, value = jnp.einsum("btd,kdhe->kbhte", x, qkv_kernel) + qkv_bias
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", query * scale, key)
    bias = self._relative_bias(query.swapaxes(1, 2))
    if bias is not None:
      logits = logits + bias
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    self.sow("intermediates", "attention_weights", weights)
    if self.dropout_rate > 0 and not deterministic:
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, value)

  def _fused_attention(self, x, kernels, biases, impl):
    """jax.nn.dot_product_attention (XLA or cuDNN); out [batch, heads, tokens, head_dim]."""
    qkv_kernel = jnp.stack(kernels, axis=1).astype(self.dtype)  # [dim, 3, heads, head_dim]
    qkv = jnp.einsum("btd,dkhe->btkhe", x, qkv_kernel) + jnp.stack(biases).astype(self.dtype)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, tokens, heads, head_dim]
    bias = self._relative_bias(query)
    if impl == "cudnn":
      out = padded_dot_product_attention(query, key, value, bias, implementation="cudnn")
    else:
      out = jax.nn.dot_product_attention(query, key, value, bias=bias)
    return out.swapaxes(1, 2)


def padded_dot_product_attention(query, key, value, bias=None, *, multiple: int = 64,
                                 implementation: Optional[str] = "cudnn"):
  """jax.nn.dot_product_attention with the tokens padded to a multiple of `multiple`.

  cuDNN's flash-attention backward pass only takes sequence lengths that are multiples of
  64 (a ViT has e.g. 197 tokens). The padding is masked out through the sequence lengths,
  so the real tokens' outputs and gradients are those of the unpadded attention.
  Args: query/key/value [batch, tokens, heads, head_dim]; bias [batch, heads, tokens, tokens].
  Returns [batch, tokens, heads, head_dim].
  """
  batch, tokens = query.shape[:2]
  extra = -tokens % multiple
  if extra:
    pad = ((0, 0), (0, extra), (0, 0), (0, 0))
    query, key, value = (jnp.pad(t, pad) for t in (query, key, value))
    if bias is not None:
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, extra), (0, extra)))
  lengths = jnp.full((batch,), tokens, jnp.int32)
  out = jax.nn.dot_product_attention(query, key, value, bias=bias, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :tokens]
