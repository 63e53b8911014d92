"""An independent transcription of Google's reference ViT, built only from stock Flax layers.

Used by the tests as the "reference code": its parameters must apply to our model
unchanged and give the same logits. It deliberately shares no code with vit_jax.models
(stock nn.MultiHeadDotProductAttention, nn.Conv, nn.GroupNorm; the StdConv trick of
standardising the kernel where nn.Conv asks for its parameter, with the reference's
`(w - mean) / (std + 1e-5)`, eps added to the standard deviation).
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp


class RefMlp(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(1e-6))(x)
    x = nn.gelu(x)  # approximate=True, as in the reference.
    return nn.Dense(d, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.normal(1e-6))(x)


class RefBlock(nn.Module):
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform())(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6)(x)
    return x + RefMlp(self.mlp_dim, name="MlpBlock_0")(y)


class RefPosEmb(nn.Module):

  @nn.compact
  def __call__(self, x):
    pe = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    return x + pe


class RefEncoder(nn.Module):
  num_layers: int
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    x = RefPosEmb(name="posembed_input")(x)
    for i in range(self.num_layers):
      x = RefBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(x)


def ref_weight_standardize(w, axis=(0, 1, 2), eps=1e-5):
  """The reference's weight standardisation: centre, then divide by (std + eps)."""
  w = w - jnp.mean(w, axis=axis, keepdims=True)
  return w / (jnp.std(w, axis=axis, keepdims=True) + eps)


class RefStdConv(nn.Conv):
  """nn.Conv whose kernel is standardised where it is asked for, as in the reference."""

  def param(self, name, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == "kernel":
      value = ref_weight_standardize(value)
    return value


def ref_group_norm(name, **kwargs):
  """The reference's GroupNorm: Flax's, 32 groups, epsilon 1e-6 (spelled out here)."""
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, name=name, **kwargs)


class RefUnit(nn.Module):
  features: int
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = RefStdConv(self.features * 4, (1, 1), self.strides, use_bias=False,
                            name="conv_proj")(residual)
      residual = ref_group_norm("gn_proj")(residual)
    y = RefStdConv(self.features, (1, 1), use_bias=False, name="conv1")(x)
    y = nn.relu(ref_group_norm("gn1")(y))
    y = RefStdConv(self.features, (3, 3), self.strides, use_bias=False, name="conv2")(y)
    y = nn.relu(ref_group_norm("gn2")(y))
    y = RefStdConv(self.features * 4, (1, 1), use_bias=False, name="conv3")(y)
    y = ref_group_norm("gn3", scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class RefStage(nn.Module):
  features: int
  size: int
  first_stride: tuple

  @nn.compact
  def __call__(self, x):
    for j in range(self.size):
      x = RefUnit(self.features, self.first_stride if j == 0 else (1, 1), name=f"unit{j + 1}")(x)
    return x


class RefViT(nn.Module):
  num_classes: int
  patch_size: int
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  classifier: str = "token"
  representation_size: Optional[int] = None
  resnet_layers: Optional[Sequence[int]] = None

  @nn.compact
  def __call__(self, x):
    if self.resnet_layers is not None:
      x = RefStdConv(64, (7, 7), (2, 2), use_bias=False, name="conv_root")(x)
      x = nn.relu(ref_group_norm("gn_root")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
      for k, size in enumerate(self.resnet_layers):
        first_stride = (1, 1) if k == 0 else (2, 2)
        x = RefStage(64 * 2**k, size, first_stride, name=f"block{k + 1}")(x)
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = RefEncoder(self.num_layers, self.mlp_dim, self.num_heads, name="Transformer")(x)
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
    return nn.Dense(self.num_classes, name="head", kernel_init=nn.initializers.zeros)(x)
