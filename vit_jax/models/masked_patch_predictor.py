"""Masked patch prediction (ViT paper, Dosovitskiy et al. 2021, Appendix B.1.2).

Self-supervised pre-training: half of the patch embeddings are corrupted (after the
`embedding` conv, before the class token and the position embeddings); of those, 80 % are
replaced by a learned `mask_token`, 10 % by the embedding of a random other patch of the
batch and 10 % are left as they are. A Dense head (`mpp_head`) predicts, from each patch's
output token, the patch's mean colour quantised to 3 bits per channel (512 classes); the
loss is the softmax cross-entropy over the corrupted patches only (`vit_jax/training/objectives/mpp.py`).

`MaskedPatchPredictor(encoder=VisionTransformer(...))` runs a copy of `encoder` under the
name 'vit' with num_classes=None, representation_size=None and an unpooled classifier
('token' -> 'token_unpooled', any other -> 'unpooled'), so the encoder returns its
normalised tokens [batch, tokens, dim] and no head. The corruption reaches the patch
tokens through VisionTransformer's `patch_fn` hook. Parameters:
  vit/...     exactly the tree of that VisionTransformer (for 'token' and 'gap' encoders
              the classifier's tree without head/pre_logits), so `checkpoint.save_npz` of
              params['vit'] loads with `checkpoint.load_pretrained` for fine-tuning.
  mask_token  [1, 1, dim]
  mpp_head    Dense(2 ** (bits * channels)), zero-initialised like the ViT head.
Random numbers: the 'mpp' rng stream draws the corruption ('dropout' as in the ViT).
"""

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.vit import VisionTransformer


class Corruption(NamedTuple):
  """How each patch is corrupted; all [batch, patches].

  corrupted: bool, the patches the loss is computed on (masked | replaced | kept).
  masked: bool, replaced by the mask token.
  replaced: bool, replaced by the embedding at flat index `source` of the batch.
  source: int32 index into the [batch * patches] patch embeddings, never the patch itself
    (meaningful where `replaced`).
  """
  corrupted: jax.Array
  masked: jax.Array
  replaced: jax.Array
  source: jax.Array


class MppOutput(NamedTuple):
  """logits float32 [batch, patches, classes]; targets int32 and corrupted bool
  [batch, patches]."""
  logits: jax.Array
  targets: jax.Array
  corrupted: jax.Array


def patch_color_targets(images, patch_size: int, bits: int = 3):
  """Each patch's mean colour quantised to `bits` per channel, as one class id.

  Args:
    images: float [batch, height, width, channels] in [-1, 1] (values outside are clipped).
    patch_size: pixels per patch side; height and width must be multiples of it.
    bits: bits per channel.
  Returns:
    int32 [batch, patches], patches in row-major order (the model's token order), in
    [0, 2 ** (bits * channels)). Per channel, m = (patch mean + 1) / 2 in [0, 1] falls in
    one of 2 ** bits equal-width bins: q = min(floor(m * 2 ** bits), 2 ** bits - 1) (bin
    edges belong to the upper bin, m = 1 to the top one). The id is the channels' q as
    digits in base 2 ** bits, first channel most significant: RGB -> (r * 8 + g) * 8 + b.
  """
  if images.ndim != 4:
    raise ValueError(f"Expected NHWC images [batch, height, width, channels], got shape "
                     f"{tuple(images.shape)}.")
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f"Image size {height}x{width} is not divisible by the patch size "
                     f"{patch_size}.")
  if bits < 1:
    raise ValueError(f"bits must be >= 1, got {bits}.")
  rows, cols = height // patch_size, width // patch_size
  x = images.astype(jnp.float32).reshape(batch, rows, patch_size, cols, patch_size, channels)
  means = jnp.clip((x.mean(axis=(2, 4)) + 1.0) / 2.0, 0.0, 1.0)
  levels = 2 ** bits
  q = jnp.minimum(jnp.floor(means * levels), levels - 1).astype(jnp.int32)
  weights = levels ** jnp.arange(channels - 1, -1, -1, dtype=jnp.int32)
  return jnp.sum(q * weights, axis=-1).reshape(batch, rows * cols)


def num_corrupted(patches: int, rate: float) -> int:
  """round(rate * patches), halves rounded up, and at least 1."""
  return max(1, int(rate * patches + 0.5))


def check_fractions(rate: float, mask_frac: float, random_frac: float) -> None:
  """ValueError unless 0 < rate <= 1, both fractions >= 0 and their sum <= 1."""
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"The corruption rate must be in (0, 1], got {rate}.")
  if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0 + 1e-9:
    raise ValueError(f"mask_frac={mask_frac} and random_frac={random_frac} must be >= 0 "
                     "and sum to at most 1 (the rest of the corrupted patches are kept).")


def corruption_masks(rng, batch: int, patches: int, rate: float = 0.5,
                     mask_frac: float = 0.8, random_frac: float = 0.1) -> Corruption:
  """Draws which patches are corrupted, and how.

  Every image gets exactly `num_corrupted(patches, rate)` corrupted patches, uniformly
  without replacement. Each corrupted patch independently becomes masked with probability
  mask_frac, replaced with probability random_frac, else kept (so the split is 80/10/10
  in expectation, not exactly). Returns a Corruption of [batch, patches] arrays.
  """
  check_fractions(rate, mask_frac, random_frac)
  pick_rng, kind_rng, source_rng = jax.random.split(rng, 3)
  order = jnp.argsort(jax.random.uniform(pick_rng, (batch, patches)), axis=-1)
  ranks = jnp.argsort(order, axis=-1)
  corrupted = ranks < num_corrupted(patches, rate)
  u = jax.random.uniform(kind_rng, (batch, patches))
  masked = corrupted & (u < mask_frac)
  replaced = corrupted & (u >= mask_frac) & (u < mask_frac + random_frac)
  total = batch * patches
  own = jnp.arange(total, dtype=jnp.int32).reshape(batch, patches)
  # Uniform over the other total - 1 patches: draw from [0, total - 1) and skip oneself.
  source = jax.random.randint(source_rng, (batch, patches), 0, max(total - 1, 1), jnp.int32)
  source = (source + (source >= own)) % total
  return Corruption(corrupted, masked, replaced, source)


def apply_corruption(tokens, corruption: Corruption, mask_token):
  """tokens [batch, patches, dim] -> the corrupted tokens, same shape.

  Replacements take the other patch's uncorrupted embedding. mask_token: [1, 1, dim].
  """
  flat = tokens.reshape(-1, tokens.shape[-1])
  others = flat[corruption.source.reshape(-1)].reshape(tokens.shape)
  x = jnp.where(corruption.replaced[..., None], others, tokens)
  return jnp.where(corruption.masked[..., None], mask_token.astype(tokens.dtype), x)


def _unpooled(classifier: str) -> str:
  return "token_unpooled" if classifier in ("token", "token_unpooled") else "unpooled"


class MaskedPatchPredictor(nn.Module):
  """`__call__(images, *, train, corrupt)`: NHWC images in [-1, 1] -> MppOutput.

  encoder: the VisionTransformer to pre-train (its classifier, num_classes and
    representation_size are overridden, see the module docstring).
  corrupt (call argument): draw a corruption from the 'mpp' rng; defaults to `train`.
    Without it, nothing is corrupted and `corrupted` is all False.
  """
  encoder: VisionTransformer
  rate: float = 0.5
  mask_frac: float = 0.8
  random_frac: float = 0.1
  bits: int = 3

  @property
  def num_channels(self) -> int:
    return self.encoder.num_channels

  @property
  def num_classes(self) -> int:
    """Colour classes: 2 ** (bits * channels), 512 for RGB and 3 bits."""
    return 2 ** (self.bits * self.num_channels)

  @nn.compact
  def __call__(self, images, *, train: bool = False, corrupt: Optional[bool] = None):
    check_fractions(self.rate, self.mask_frac, self.random_frac)
    vit = self.encoder.clone(parent=self, name="vit", num_classes=None,
                             representation_size=None,
                             classifier=_unpooled(self.encoder.classifier))
    mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                            (1, 1, self.encoder.hidden_size))
    targets = patch_color_targets(images, vit.total_stride, self.bits)
    batch, patches = targets.shape
    corruption, patch_fn = None, None
    if train if corrupt is None else corrupt:
      corruption = corruption_masks(self.make_rng("mpp"), batch, patches, self.rate,
                                    self.mask_frac, self.random_frac)
      patch_fn = functools.partial(apply_corruption, corruption=corruption,
                                   mask_token=mask_token)
    x = vit(images, train=train, patch_fn=patch_fn)[:, -patches:]  # Drops the class token.
    logits = nn.Dense(self.num_classes, dtype=jnp.dtype(self.encoder.dtype), name="mpp_head",
                      kernel_init=nn.initializers.zeros)(x)
    corrupted = (jnp.zeros((batch, patches), bool) if corruption is None
                 else corruption.corrupted)
    return MppOutput(logits.astype(jnp.float32), targets, corrupted)
