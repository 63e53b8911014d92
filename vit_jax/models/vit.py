"""The Vision Transformer (Dosovitskiy et al., ICLR 2021), optionally on a ResNet stem.

images [batch, height, width, channels]
  -> (hybrid) ResNet feature map
  -> `embedding`: conv with kernel = stride = patch -> [batch, rows, cols, dim]
  -> tokens [batch, rows * cols, dim], with the `cls` token prepended for 'token' heads
  -> `Transformer` (position embeddings, pre-LN blocks, `encoder_norm`)
  -> pooling by `classifier` -> optional tanh `pre_logits` -> zero-initialised `head`.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.models import params as names
from vit_jax.models import posembed
from vit_jax.models import resnet
from vit_jax.models.encoder import Encoder, MlpBlock

CLASSIFIERS = ("token", "gap", "unpooled", "token_unpooled", "map")


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): a learned probe attends over the tokens.

  [batch, tokens, dim] -> [batch, dim]
  """
  num_heads: int
  mlp_dim: int
  approximate_gelu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
    probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(x.dtype)
    x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        kernel_init=nn.initializers.xavier_uniform())(probe, x)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    x = x + MlpBlock(self.mlp_dim, approximate_gelu=self.approximate_gelu,
                     dtype=self.dtype)(y, deterministic=True)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier. `__call__(images, *, train, patch_fn)`: NHWC float images -> logits.

  `patch_fn` (optional): [batch, patches, dim] -> same, applied to the patch embeddings
  before the class token and position embeddings (masked patch prediction, models/mpp.py).

  Logits are [batch, classes] for 'token', 'gap' and 'map'; [batch, tokens, classes] for
  'unpooled' (patch tokens) and 'token_unpooled' (class token first). With
  `num_classes=None` the head is left out and the pooled features are returned.
  """
  num_classes: Optional[int]
  patch_size: int = 16
  hidden_size: int = 768
  mlp_dim: int = 3072
  num_heads: int = 12
  num_layers: int = 12
  classifier: str = "token"
  representation_size: Optional[int] = None
  resnet_layers: Optional[Sequence[int]] = None  # None: plain ViT; (): stem only.
  resnet_width_factor: int = 1
  ws_form: str = "reference"  # Hybrids' weight standardisation, see resnet.WS_FORMS.
  posemb: str = "learn"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  approximate_gelu: bool = True
  head_bias_init: float = 0.0
  num_channels: int = 3
  dtype: Any = "float32"
  scan: bool = False
  remat_policy: str = "none"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, images, *, train: bool = False, patch_fn=None):
    self._check_options()
    self._check_images(images)
    dtype = jnp.dtype(self.dtype)
    x = images.astype(dtype)
    if self.resnet_layers is not None:
      x = resnet.resnet_features(x, tuple(self.resnet_layers),
                                 64 * self.resnet_width_factor, dtype, self.ws_form)
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                name=names.EMBEDDING)(x)
    batch, rows, cols, dim = x.shape
    x = x.reshape(batch, rows * cols, dim)
    if patch_fn is not None:
      x = patch_fn(x)
    num_prefix = 1 if self.classifier in ("token", "token_unpooled") else 0
    if num_prefix:
      cls = self.param(names.CLS, nn.initializers.zeros, (1, 1, dim))
      x = jnp.concatenate([jnp.tile(cls.astype(dtype), (batch, 1, 1)), x], axis=1)

    x = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        grid=(rows, cols), num_prefix_tokens=num_prefix, posemb=self.posemb,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth, approximate_gelu=self.approximate_gelu,
        attention_impl=self.attention_impl, scan=self.scan,
        remat_policy=self.remat_policy, dtype=dtype, name=names.TRANSFORMER)(x, train=train)

    x = self._pool(x)
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, dtype=dtype, name=names.PRE_LOGITS)(x))
    self.sow("intermediates", "pre_logits", x)
    if self.num_classes is None:
      return x
    x = nn.Dense(self.num_classes, dtype=dtype, name=names.HEAD,
                 kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.constant(self.head_bias_init))(x)
    return x.astype(jnp.float32)

  def _pool(self, x):
    """[batch, tokens, dim] -> [batch, dim], or the tokens themselves when unpooled."""
    if self.classifier == "token":
      return x[:, 0]
    if self.classifier == "gap":
      return jnp.mean(x, axis=1)
    if self.classifier == "map":
      return MAPHead(self.num_heads, self.mlp_dim, self.approximate_gelu,
                     dtype=jnp.dtype(self.dtype), name="MAPHead_0")(x)
    return x  # 'unpooled', 'token_unpooled'

  @property
  def total_stride(self) -> int:
    """Pixels per token along each side."""
    if self.resnet_layers is None:
      return self.patch_size
    return self.patch_size * resnet.total_stride(self.resnet_layers)

  def _check_options(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"Unknown classifier {self.classifier!r}; choose one of {CLASSIFIERS}.")
    posembed.check_posemb_type(self.posemb)
    resnet.check_ws_form(self.ws_form)

  def _check_images(self, images):
    if images.ndim != 4:
      raise ValueError(f"Expected NHWC images [batch, height, width, channels], got shape "
                       f"{tuple(images.shape)}.")
    _, height, width, channels = images.shape
    if channels != self.num_channels:
      raise ValueError(
          f"The model's embedding is built for {self.num_channels} input channels, but the "
          f"images have {channels} (shape {tuple(images.shape)}). Convert them (e.g. "
          "grayscale to RGB) or set num_channels.")
    stride = self.total_stride
    if height % stride or width % stride:
      what = "patch size" if self.resnet_layers is None else "ResNet stride x patch size"
      raise ValueError(
          f"Image size {height}x{width} is not divisible by the {what} {stride}; resize "
          f"the images to a multiple of {stride} (e.g. {height // stride * stride or stride}).")
