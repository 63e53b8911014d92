"""The ResNet (BiT-style: weight-standardised convs + GroupNorm) of the hybrid models.

Its feature map is embedded by the ViT with patch size 1 (or 8 for the stem-only
R+ViT-Ti_16). Parameter names follow the reference: `conv_root`, `gn_root`,
`block{k}/unit{j}/{conv1,gn1,conv2,gn2,conv3,gn3,conv_proj,gn_proj}`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Weight standardisation of every conv kernel, over H, W and in-channels:
# 'reference': Google's code, (w - mean) / (std + 1e-5), the eps added to the std.
# 'timm':      timm's StdConv2d in its hybrid ViTs, (w - mean) / sqrt(var + 1e-8).
# Both read the same parameters; the outputs differ by about 1e-5 / std(w) relative per conv.
WS_FORMS = ("reference", "timm")
REFERENCE_WS_EPS = 1e-5
TIMM_WS_EPS = 1e-8
GROUP_NORM_EPS = 1e-6  # The reference's (Flax's default), with 32 groups.


def check_ws_form(ws_form: str) -> None:
  if ws_form not in WS_FORMS:
    raise ValueError(f"Unknown ws_form {ws_form!r}; choose 'reference' (Google's "
                     "(w - mean) / (std + 1e-5)) or 'timm' ((w - mean) / sqrt(var + 1e-8)).")


def standardize(kernel, ws_form: str = "reference"):
  """Zero-mean, unit-std HWIO kernel per output channel (over H, W and in-channels)."""
  check_ws_form(ws_form)
  axes = (0, 1, 2)
  centred = kernel - jnp.mean(kernel, axis=axes, keepdims=True)
  if ws_form == "reference":
    return centred / (jnp.std(centred, axis=axes, keepdims=True) + REFERENCE_WS_EPS)
  return centred / jnp.sqrt(jnp.var(centred, axis=axes, keepdims=True) + TIMM_WS_EPS)


def group_norm(dtype, name, **kwargs):
  return nn.GroupNorm(num_groups=32, epsilon=GROUP_NORM_EPS, dtype=dtype, name=name, **kwargs)


class StdConv(nn.Module):
  """Weight-standardised conv, SAME padding, no bias: [b, h, w, c] -> [b, h/s, w/s, features]."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  ws_form: str = "reference"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
    kernel = standardize(kernel, self.ws_form)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), self.strides, "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BottleneckUnit(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 to 4x `features`, with a projected shortcut if needed."""
  features: int
  strides: tuple[int, int] = (1, 1)
  ws_form: str = "reference"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: StdConv(f, k, s, self.ws_form, dtype=self.dtype, name=name)
    norm = lambda name, **kw: group_norm(self.dtype, name, **kw)
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides, "conv_proj")(residual)
      residual = norm("gn_proj")(residual)
    y = nn.relu(norm("gn1")(conv(self.features, (1, 1), (1, 1), "conv1")(x)))
    y = nn.relu(norm("gn2")(conv(self.features, (3, 3), self.strides, "conv2")(y)))
    y = norm("gn3", scale_init=nn.initializers.zeros)(
        conv(self.features * 4, (1, 1), (1, 1), "conv3")(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` bottleneck units (`unit1`, `unit2`, ...); the first one may stride."""
  block_size: int
  features: int
  first_stride: tuple[int, int]
  ws_form: str = "reference"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    unit = lambda strides, name: BottleneckUnit(self.features, strides, self.ws_form,
                                                self.dtype, name=name)
    x = unit(self.first_stride, "unit1")(x)
    for j in range(2, self.block_size + 1):
      x = unit((1, 1), f"unit{j}")(x)
    return x


def total_stride(num_layers: Sequence[int]) -> int:
  """Downsampling of the ResNet: 4 for the stem, then x2 for every stage after the first."""
  return 4 * 2 ** max(len(num_layers) - 1, 0)


def resnet_features(x, num_layers: Sequence[int], width: int, dtype,
                    ws_form: str = "reference"):
  """Stem and stages on NHWC images -> [b, h/stride, w/stride, channels].

  Call from within a compact method: the layers are named in the caller's scope, as in
  the reference checkpoints (no `ResNet/` prefix).
  """
  x = StdConv(width, (7, 7), (2, 2), ws_form, dtype=dtype, name="conv_root")(x)
  x = nn.relu(group_norm(dtype, "gn_root")(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
  for k, block_size in enumerate(num_layers):
    x = ResNetStage(block_size, width * 2**k, (1, 1) if k == 0 else (2, 2), ws_form,
                    dtype, name=f"block{k + 1}")(x)
  return x
